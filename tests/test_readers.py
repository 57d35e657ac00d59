"""Bad input: every kind of bad row is reported as file:line (raise) or counted (skip)."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_embed.data.readers import DataError, Source
from dist_embed.data.rows import Schema, SkipCounter, scan, validate_rows
from dist_embed.evaluation.sts import load_sts

MNRL = Schema.for_loss("mnrl")
GOOD = {"anchor": "a cat", "positive": "an animal", "negative": "a car"}


def rows_of(path, schema=MNRL, on_error="raise", columns=None, skips=None):
    return list(validate_rows(Source(str(path)).records(), schema, columns or {}, on_error, skips))


BAD_LINES = [
    ('{"anchor": "x", "positive": "y"', "malformed JSON"),
    ('{"anchor": "x"}', "missing column 'positive'"),
    ('{"anchor": null, "positive": "y"}', "column 'anchor': null text"),
    ('{"anchor": "", "positive": "y"}', "column 'anchor': empty or whitespace-only text"),
    ('{"anchor": "  \\t ", "positive": "y"}', "empty or whitespace-only"),
    ('{"anchor": 3, "positive": "y"}', "expected text, got int"),
    ('[1, 2]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_jsonl_row_raises_with_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        rows_of(p)
    assert str(e.value).startswith(f"{p}:3: ") and message in str(e.value)


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"anchor": "caf\xe9", "positive": "y"}\n')
    with pytest.raises(DataError, match=f"{p}:2: not valid UTF-8"):
        rows_of(p)


def test_skip_counts_per_reason_and_keeps_row_ids(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    lines = [json.dumps(GOOD)] + [l for l, _ in BAD_LINES] + [json.dumps(GOOD)]
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines) + "\n")
    skips = SkipCounter()
    rows = rows_of(p, on_error="skip", skips=skips)
    assert [r.row_id for r in rows] == [0, len(lines) - 1]
    assert skips.total == len(BAD_LINES)
    assert "malformed JSON" in skips.summary() and "null text" in skips.summary()


def test_max_skip_fraction(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([json.dumps(GOOD)] * 9 + ["{bad"]) + "\n")
    assert scan(Source(str(p)), MNRL, {}, "skip", 0.2).rows == 9
    with pytest.raises(DataError, match="1 of 10 rows are bad"):
        scan(Source(str(p)), MNRL, {}, "skip", 0.05)


def test_csv_tsv_parquet_and_column_mapping(tmp_path):
    (tmp_path / "d.csv").write_text('premise,hypothesis\n"a, quoted",b\nc,d\n')
    rows = rows_of(tmp_path / "d.csv", columns={"anchor": "premise", "positive": "hypothesis"})
    assert [r.texts for r in rows] == [("a, quoted", "b"), ("c", "d")]
    # tsv: quoting off, quotes are text (STS-B style)
    (tmp_path / "d.tsv").write_text('sentence1\tsentence2\tscore\n"x\ty"z\t0.5\n')
    r = rows_of(tmp_path / "d.tsv", Schema.for_loss("cosine"))
    assert r[0].texts == ('"x', 'y"z') and r[0].score == 0.5
    pq.write_table(pa.table({"anchor": ["a", "b"], "positive": ["c", "d"], "negative": ["e", "f"],
                             "negative_2": ["g", "h"]}), tmp_path / "d.parquet")
    r = rows_of(tmp_path / "d.parquet")
    assert r[1].texts == ("b", "d", "f", "h")
    with pytest.raises(DataError, match="missing column 'premise'.*data.columns maps anchor -> premise"):
        rows_of(tmp_path / "d.parquet", columns={"anchor": "premise"})


def test_score_errors_and_field_count(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("sentence1\tsentence2\tscore\na\tb\t0.3\nc\td\thigh\n")
    with pytest.raises(DataError, match=f"{p}:3: column 'score': score is not a number: 'high'"):
        load_sts(str(p))
    p.write_text("sentence1\tsentence2\tscore\na\tb\n")
    with pytest.raises(DataError, match=f"{p}:2: expected 3 fields"):
        load_sts(str(p))


def test_real_sts_and_snli_files_read_cleanly():
    from conftest import QUICK, SHARED

    if SHARED.exists():
        assert len(load_sts(str(SHARED / "stsb" / "dev.tsv")).scores) == 1500
    assert len(load_sts(str(QUICK / "snli-dev-pairs-1k.tsv")).scores) == 1000
    assert len(rows_of(QUICK / "snli-test-triplets-2k.jsonl.gz")) == 2000


def test_json_errors_name_the_real_column(tmp_path):
    line = '{"anchor": "a cat", "positive": an animal}'
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        rows_of(f)
    col = line.index("an animal") + 1
    assert str(e.value) == f"{f}:2: malformed JSON at column {col}: Expecting value"


def test_bom_and_crlf_are_read(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    assert len(rows_of(f)) == 2
    t = tmp_path / "bom.tsv"
    t.write_bytes(b"\xef\xbb\xbfanchor\tpositive\r\nx\ty\r\n")
    assert [r.texts for r in rows_of(t)] == [("x", "y")]


def test_sts_sets_from_a_saved_hugging_face_dataset(tmp_path):
    """Eval sets may be Hugging Face datasets (hub ids such as sentence-transformers/stsb, or saved
    ones): the validation split by default."""
    import datasets

    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i / 10} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "sts"))
    data = load_sts(str(tmp_path / "sts"), "sts")
    assert data.sentences1 == [r["sentence1"] for r in rows] and list(data.scores) == [r["score"] for r in rows]
    assert len(load_sts(str(tmp_path / "sts"), split="train").scores) == 4
