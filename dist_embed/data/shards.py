"""webdataset tar shards: the layout ``prepare-data`` writes and the reader training streams.

A shard is a plain tar that webdataset (and ``tar``) reads. One webdataset *sample* is a block of
up to ``block_rows`` rows, not a single row: parsing a tar member costs far more than a row of JSON
(docs/data.md), so one member per row would cap the reading rate; blocks of 1,024 rows
put the cost in ``json.loads`` (C) and keep the format a standard webdataset. A sample holds::

    KEY.rows.json   {"columns": [...], "rows": [[value, ...], ...]}     always
    KEY.ids.npy     int32, every text's token ids, row by row, column by column  (pre-tokenized)
    KEY.lens.npy    int32 [rows, text columns]: the lengths of those id runs      (pre-tokenized)

``manifest.json`` beside the shards lists each shard's rows and sha256, the columns, the sources'
fingerprint and the tokenizer the ids were made with; training reads row counts from it instead
of scanning. Positions (for exact resume) are ``{shard, block, index, row}``: a resume re-opens one
shard and skips whole blocks unread-but-unparsed, so its cost is bounded by a shard, not the epoch.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from itertools import accumulate
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np

from .records import DataError, Record

MANIFEST = "manifest.json"
FORMAT = "dist_embed-webdataset"
VERSION = 1


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Member headers with nothing from the machine (time, owner): the same rows give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, blocks: list[dict], first_key: int) -> tuple[str, int, list[list]]:
    """Write one shard (atomically: a temporary name, then rename). ``blocks``: dicts with
    ``columns``, ``rows`` and optionally ``ids``/``lens`` arrays. Returns (sha256, bytes, spans):
    each block's [offset, length, sha256] in the file, so that a rank of the sharded plane reads
    and checks just its blocks."""
    tmp = path.with_name(path.name + ".partial")
    spans = []
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, block in enumerate(blocks):
                key = f"{first_key + i:012d}"
                members = [("rows.json", json.dumps({"columns": block["columns"], "rows": block["rows"]},
                                                    ensure_ascii=False, separators=(",", ":")).encode("utf-8"))]
                if block.get("ids") is not None:
                    members += [("ids.npy", _npy(block["ids"])), ("lens.npy", _npy(block["lens"]))]
                start = tf.offset
                for ext, data in members:
                    tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                spans.append([start, tf.offset - start])
        raw = tmp.read_bytes()
        for span in spans:
            span.append(hashlib.sha256(memoryview(raw)[span[0]:span[0] + span[1]]).hexdigest())
        digest, size = hashlib.sha256(raw).hexdigest(), len(raw)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a half-written shard left behind
        raise
    tmp.replace(path)
    return digest, size, spans


def file_sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ---------------------------------------------------------------------------------------------
# where shards are


def is_shard_spec(path: str) -> bool:
    """A shard directory (with a manifest), a ``.tar`` name or brace pattern, or a URL to tars."""
    p = Path(path)
    if p.is_dir():
        return (p / MANIFEST).is_file()
    return path.endswith(".tar") or (".tar" in path and "{" in path) or path.startswith("pipe:") or \
        (p.name == MANIFEST)


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local(url: str) -> Path:
    return Path(urlparse(url).path) if url.startswith("file:") else Path(url)


def open_url(url: str):
    """A binary stream for a shard or manifest: local files, webdataset's ``pipe:`` and its other
    schemes (http, gs, ...), and any fsspec protocol (s3://, gcs://, memory://, ...) otherwise."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or url.startswith("pipe:") or scheme in gopen_schemes:
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading {scheme}:// URLs needs fsspec (pip install fsspec s3fs/gcsfs)") from None
    return fsspec.open(url, "rb").open()


def load_manifest(url: str) -> dict | None:
    """The manifest at ``url`` (None if there is none there); a malformed one is bad input."""
    try:
        if _is_local(url) and not _local(url).is_file():
            return None
        with open_url(url) as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    try:
        man = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: not a valid manifest (malformed JSON: {e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("shards"), list):
        fmt = man.get("format") if isinstance(man, dict) else None
        raise DataError(f"{url}: not a dist_embed shard manifest (format {fmt!r})")
    if man.get("version", 0) > VERSION:
        raise DataError(f"{url}: manifest version {man['version']} is newer than this dist_embed reads ({VERSION})")
    return man


def shard_urls(spec: str) -> tuple[list[str], dict | None]:
    """(shard URLs in order, manifest or None) for ``data.train``: a directory or manifest path
    (the manifest's shards), a brace pattern (``shards/train-{000000..000099}.tar``), a single
    ``.tar``, or remote URLs; a manifest beside remote/pattern shards is used when it exists."""
    from braceexpand import braceexpand

    p = Path(spec)
    if p.is_dir() or p.name == MANIFEST:
        mpath = p / MANIFEST if p.is_dir() else p
        man = load_manifest(str(mpath))
        if man is None:
            raise DataError(f"{spec}: no {MANIFEST} (write shards with dist-embed prepare-data)")
        urls = [str(mpath.parent / s["name"]) for s in man["shards"]]
        _check_local(urls)
        return urls, man
    urls = list(braceexpand(spec))
    if all(_is_local(u) for u in urls):
        _check_local(urls)
    base = spec.rsplit("/", 1)[0] if "/" in spec and not spec.startswith("pipe:") else "."
    man = load_manifest(f"{base}/{MANIFEST}") if "{" not in base else None
    if man is not None:  # only if it describes exactly these shards
        names = {s["name"]: s for s in man["shards"]}
        if not all(u.rsplit("/", 1)[-1] in names for u in urls):
            man = None
        else:
            man = {**man, "shards": [names[u.rsplit("/", 1)[-1]] for u in urls]}
            man["rows"] = sum(s["rows"] for s in man["shards"])
    return urls, man


def _check_local(urls: list[str]) -> None:
    missing = [u for u in urls if _is_local(u) and not _local(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: shard not found{more}")


# ---------------------------------------------------------------------------------------------
# reading


class _Verified:
    """A shard's byte stream, hashed as it is read (webdataset's tar reader reads it front to
    back; blocks a resume skips are read, only not parsed): at the end the size and sha256 must
    be the manifest's, else the shard changed after prepare-data wrote it."""

    def __init__(self, stream, url: str, entry: dict):
        self.stream, self.url, self.entry = stream, url, entry
        self.sha, self.size = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def check(self) -> None:
        while self.read(1 << 20):  # the tar's end-of-archive padding
            pass
        if self.size != self.entry["bytes"]:
            raise DataError(f"{self.url}: {self.size} bytes, but {MANIFEST} says {self.entry['bytes']}: "
                            f"{'truncated' if self.size < self.entry['bytes'] else 'changed'} since prepare-data "
                            "wrote it (write the shards again)")
        if self.sha.hexdigest() != self.entry["sha256"]:
            raise DataError(f"{self.url}: its sha256 differs from {MANIFEST}'s: the shard changed after "
                            "prepare-data wrote it (a damaged or replaced file; write the shards again)")

    def close(self) -> None:
        self.stream.close()


def _samples(url: str, entry: dict | None = None) -> Iterator[dict]:
    """The samples of one shard, through webdataset's own tar parsing and key grouping; checked
    against its manifest ``entry`` (bytes and sha256) when there is one: a local file's size at
    open, the sha256 of what was read at the end."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    if entry is not None and _is_local(url) and _local(url).is_file():
        size, expected = _local(url).stat().st_size, entry.get("bytes", -1)
        if size != expected:
            raise DataError(f"{url}: {size} bytes, but {MANIFEST} says {expected}: "
                            f"{'truncated' if size < expected else 'changed'} since prepare-data wrote it "
                            "(write the shards again)")
    try:
        stream = open_url(url)
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: cannot open shard: {e}") from None
    if entry is not None and entry.get("sha256"):
        stream = _Verified(stream, url, entry)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        if isinstance(stream, _Verified):
            stream.check()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{url}: unreadable shard (truncated or not a tar): {e}") from None
    finally:
        stream.close()


def _block(sample: dict, url: str):
    key = sample.get("__key__", "?")
    try:
        block = json.loads(sample["rows.json"])
        columns, rows = block["columns"], block["rows"]
        ids = lens = None
        if "ids.npy" in sample:
            ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
            lens = np.load(io.BytesIO(sample["lens.npy"]), allow_pickle=False)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{url}: sample {key}: not a dist_embed row block ({type(e).__name__}: {e})") from None
    return key, columns, rows, ids, lens


def id_cuts(ids, lens, id_columns: list[str] | None) -> dict | None:
    """Each of ``id_columns`` -> a function of the row index giving that text's token ids."""
    if ids is None or id_columns is None:
        return None
    # each text's ids as a bytes slice (int32): cheaper to cut than numpy views, and not a
    # container the garbage collector walks while it waits in the shuffle buffer
    raw = ids.astype("<i4", copy=False).tobytes()
    offsets = [0, *accumulate(4 * n for n in lens.ravel().tolist())]
    width = lens.shape[1]
    return {c: (lambda i, j=j: raw[offsets[i * width + j]:offsets[i * width + j + 1]])
            for j, c in enumerate(id_columns)}


def local_block(url: str, entry: dict, block: int, index: dict) -> dict:
    """Block ``block`` of a local shard as a sample (suffix -> bytes), read alone: by its span in
    the manifest (written by prepare-data), checked against the span's sha256; else found by the
    shard's tar headers (read once into ``index``)."""
    path = _local(url)
    if entry.get("block_spans"):
        offset, length, digest = entry["block_spans"][block]
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        if len(raw) != length or hashlib.sha256(raw).hexdigest() != digest:
            raise DataError(f"{url}: block {block} differs from {MANIFEST}'s sha256: the shard changed after "
                            "prepare-data wrote it (write the shards again)")
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
                return {m.name.partition(".")[2]: tf.extractfile(m).read() for m in tf.getmembers()}
        except (tarfile.TarError, OSError, AttributeError) as e:
            raise DataError(f"{url}: block {block} unreadable: {e}") from None
    if url not in index:
        if path.stat().st_size != entry.get("bytes", path.stat().st_size):
            raise DataError(f"{path}: {path.stat().st_size} bytes, but {MANIFEST} says {entry['bytes']}: changed "
                            "since prepare-data wrote it (write the shards again)")
        blocks: dict[str, dict] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf.getmembers():
                    key, _, suffix = m.name.partition(".")
                    blocks.setdefault(key, {})[suffix] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: unreadable shard (truncated or not a tar): {e}") from None
        index[url] = [blocks[key] for key in sorted(blocks)]
    sample = {}
    with open(path, "rb") as f:
        for suffix, (offset, size) in index[url][block].items():
            f.seek(offset)
            sample[suffix] = f.read(size)
    return sample


def block_rows(sample: dict, where: str, id_columns: list[str] | None):
    """(columns, rows, id cuts) of a block sample."""
    _, columns, rows, ids, lens = _block(sample, where)
    return columns, rows, id_cuts(ids, lens, id_columns)


def shard_blocks(urls: list[str], start: dict, at: dict, id_columns: list[str] | None,
                 entries: list[dict] | None = None):
    """The row blocks of the shards from ``start`` (``{shard, block, index, row}``) on, as
    ``(url, key, columns, rows, ids, first)``: ``ids`` maps each of ``id_columns`` to a function
    of the row index giving that text's token ids (None: no ids wanted or none stored), ``first``
    the first row to read. ``at`` is kept at the block boundaries; the caller, reading rows, keeps
    ``at["index"]`` and ``at["row"]`` (the position right after its last row). ``entries``: each
    shard's manifest entry: its bytes and sha256 are checked as it streams, its rows at its end."""
    at.setdefault("row", start.get("row", 0))
    first_shard = start.get("shard", 0)
    for s in range(first_shard, len(urls)):
        url = urls[s]
        skip_blocks = start.get("block", 0) if s == first_shard else 0
        first = start.get("index", 0) if s == first_shard else 0
        entry = entries[s] if entries is not None else None
        rows_seen = 0
        for b, sample in enumerate(_samples(url, entry)):
            if b < skip_blocks:
                continue  # whole blocks before the position: not parsed
            key, columns, rows, ids, lens = _block(sample, url)
            rows_seen += len(rows)
            cuts = id_cuts(ids, lens, id_columns)
            at["shard"], at["block"] = s, b
            yield url, key, columns, rows, cuts, first
            first = 0
            at["block"], at["index"] = b + 1, 0
        if entry is not None and not skip_blocks and rows_seen != entry.get("rows", rows_seen):
            raise DataError(f"{url}: {rows_seen} rows, but {MANIFEST} says {entry['rows']} (write the shards again)")
        at["shard"], at["block"], at["index"] = s + 1, 0, 0


def read_shards(urls: list[str], text_columns: list[str] | None, start: dict | None = None,
                at: dict | None = None, entries: list[dict] | None = None) -> Iterator[Record]:
    """Records of the shards from ``start`` on (see ``shard_blocks``). ``text_columns``: which
    columns the blocks' token ids belong to (None: ignore ids)."""
    start = dict(start or {})
    at = {} if at is None else at
    row_id = start.get("row", 0)
    for url, key, columns, rows, cuts, first in shard_blocks(urls, start, at, text_columns, entries):
        for i in range(first, len(rows)):
            at["index"], at["row"] = i + 1, row_id + 1  # plain stores: this loop runs per row
            yield Record(row_id, f"{url}: sample {key} row {i}", dict(zip(columns, rows[i])),
                         {c: cut(i) for c, cut in cuts.items()} if cuts else None)
            row_id += 1
