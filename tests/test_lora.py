"""LoRA through peft: only the adapters train, resume is exact (dropout on), checkpoints are
complete merged models, and final/ as merged weights or as the adapter loads in sentence-transformers."""
import json

import numpy as np
import pytest
import torch

from conftest import quick_triplets, run_cli, tiny_config, train_losses, write_jsonl

pytestmark = pytest.mark.slow
TEXTS = ["A man is playing a guitar.", "Kittens.", "The quick brown fox jumps over the lazy dog twice."]
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]}


def test_lora_trains_adapters_only_resumes_exactly_and_exports(tmp_path, tiny_model):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from dist_embed.model.encoder import Encoder

    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": 0.1, "lora": LORA},
                      training={"max_steps": 4, "lr": 1e-2}, checkpoint={"steps": 2})
    straight, resumed, adapter = tmp_path / "straight", tmp_path / "resumed", tmp_path / "adapter"
    for out, extra in ((straight, []), (resumed, ["--resume", str(straight / "checkpoints" / "step-2")]),
                       (adapter, ["model.lora.export=adapter"])):
        r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    r = run_cli("train", cfg, f"output_dir={one}", "training.batch_size=16", "checkpoint.steps=0",
                "model.dropout=0", "model.lora.dropout=0")
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = run_cli("train", cfg, f"output_dir={two}", "--nproc", "2", "checkpoint.steps=0", "model.dropout=0",
                "model.lora.dropout=0")
    assert r.returncode == 0, r.stderr[-3000:]
    # the same adapters on every rank (their random init is seeded apart from the ranks' dropout RNG)
    assert train_losses(one) == pytest.approx(train_losses(two), rel=1e-5)
    a, b = train_losses(straight), train_losses(resumed)
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    start = load_file(str(tiny_model / "model.safetensors"))
    merged = load_file(str(straight / "final" / "model.safetensors"))
    assert set(merged) == set(start)  # the base model's own names: a complete plain model
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all(("query" in k or "value" in k) and k.endswith("weight") for k in changed), changed
    again = load_file(str(resumed / "final" / "model.safetensors"))
    assert max(float((again[k] - merged[k]).abs().max()) for k in merged) < 1e-6
    st = SentenceTransformer(str(straight / "final"), device="cpu")
    ours = Encoder.from_pretrained(str(straight / "final")).encode(TEXTS)
    assert np.abs(st.encode(TEXTS) - ours).max() < 1e-5
    # adapter export: no full weights, and base + adapter in sentence-transformers = our merged model
    final = adapter / "final"
    assert not (final / "model.safetensors").exists() and (final / "adapter_model.safetensors").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    st_adapter = SentenceTransformer(str(final), device="cpu")
    assert np.abs(st_adapter.encode(TEXTS) - st.encode(TEXTS)).max() < 1e-5  # same seed, same run
    # `dist-embed merge`: the adapter export -> a plain merged model, as the merged export
    r = run_cli("merge", final, tmp_path / "merged")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "README.md").is_file()
    plain = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert np.abs(plain.encode(TEXTS) - st.encode(TEXTS)).max() < 1e-5
    r = run_cli("merge", straight / "final", tmp_path / "nothing")  # a merged model is no adapter export
    assert r.returncode == 2 and "Traceback" not in r.stderr and "adapter_config.json" in r.stderr.strip(), r.stderr
    # merge never writes into the export or over a directory, and checks the adapter file first
    import shutil

    listing = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    for target, words in ((final, "needs a directory of its own"), (final / "sub", "needs a directory of its own"),
                          (tmp_path / "merged", "already exists")):
        r = run_cli("merge", final, target)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert words in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == listing
    r = run_cli("merge", final, tmp_path / "merged", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.abs(SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(TEXTS) - st.encode(TEXTS)).max() < 1e-5
    cut = shutil.copytree(final, tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = run_cli("merge", cut, tmp_path / "from-cut")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"dist-embed: error: {weights}: truncated")
    assert not (tmp_path / "from-cut").exists()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_lora_under_zero_trains_as_under_ddp_resumes_and_exports(tmp_path, tiny_model, stage):
    """ZeRO-2 keeps whole weights; ZeRO-3 builds the base partitioned, and the merged export gathers
    each LoRA layer's base weight and adapters together. Dropout on (model and adapters): the same
    masks as the DDP path draw, so the same losses; a resume in the middle continues exactly."""
    from sentence_transformers import SentenceTransformer

    from conftest import REPO

    ds = ["distributed.backend=deepspeed", f"distributed.deepspeed_config={REPO / 'configs' / 'deepspeed' / stage}.json"]
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": 0.1, "lora": LORA},
                      training={"max_steps": 4, "lr": 1e-2}, checkpoint={"steps": 2})
    runs = {"ddp": [], "zero": ds, "resumed": [*ds, "--resume", str(tmp_path / "zero" / "checkpoints" / "step-2")],
            "adapter": [*ds, "model.lora.export=adapter", "checkpoint.steps=0"]}
    for name, extra in runs.items():
        r = run_cli("train", cfg, f"output_dir={tmp_path / name}", "--nproc", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = (train_losses(tmp_path / n) for n in ("ddp", "zero", "resumed"))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and sorted(c) == [3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    for step in c:
        assert abs(b[step] - c[step]) <= 1e-5 * abs(b[step]), (step, b[step], c[step])
    ddp = SentenceTransformer(str(tmp_path / "ddp" / "final"), device="cpu").encode(TEXTS)
    for name in ("zero", "resumed", "adapter"):
        got = SentenceTransformer(str(tmp_path / name / "final"), device="cpu").encode(TEXTS)
        assert np.abs(got - ddp).max() < 1e-4, name
    assert (tmp_path / "adapter" / "final" / "adapter_model.safetensors").is_file()
