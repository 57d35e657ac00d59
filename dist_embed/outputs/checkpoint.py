"""Atomic, verified checkpoints in the sentence-transformers layout, plus resumable training state.

A checkpoint is written into a hidden temporary directory, every file is fsynced, a manifest with
sizes and SHA-256 sums is written last, and only then is the directory renamed into place. A reader
therefore sees either nothing or a complete checkpoint; ``find_resumable`` skips any directory whose
manifest is missing or does not match the files (a truncated copy, a crash in the middle of a write).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_DIR = "training_state"
STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, info: dict | None = None) -> None:
    """Sizes and SHA-256 sums of every file under ``root``, and ``info`` (e.g. the step it holds)."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(root))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, **(info or {}), "files": files}, indent=1), encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def verify(root: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    mf = root / MANIFEST
    if not mf.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(mf.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta["size"]:
            return f"{rel}: size {p.stat().st_size} != {meta['size']} in manifest (truncated?)"
        if _sha256(p) != meta["sha256"]:
            return f"{rel}: checksum mismatch"
    return None


def manifest_info(root: Path) -> dict:
    """What the manifest says besides the files (``{}`` if unreadable)."""
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k not in ("format", "files")} if isinstance(data, dict) else {}


def staging_dir(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def begin(final: Path) -> Path:
    """Create a fresh staging directory for ``final`` (removing leftovers of a crashed write)."""
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, info: dict | None = None) -> None:
    """fsync, manifest last (with ``info``), then rename into place (replacing an older copy at ``final``)."""
    _fsync_tree(tmp)
    write_manifest(tmp, info)
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(out)


def find_resumable(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are reported and passed over."""
    for step, path in reversed(step_dirs(ckpt_root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable: %s; trying the previous one", path, problem)
    return None


def best_checkpoint(ckpt_root: Path, metric: str) -> tuple[Path, float] | None:
    """The checkpoint whose recorded ``metric`` (eval at its step) is highest."""
    best = None
    for _, path in step_dirs(ckpt_root):
        try:
            value = json.loads((path / STATE_DIR / "trainer.json").read_text()).get("metrics", {}).get(metric)
        except (OSError, ValueError):
            continue
        if value is not None and value == value and (best is None or value > best[1]):
            best = (path, value)
    return best


def prune(ckpt_root: Path, keep_last: int | None, protect: set[Path] = frozenset()) -> None:
    if not keep_last:
        return
    dirs = step_dirs(ckpt_root)
    for _, path in dirs[:-keep_last]:
        if path not in protect:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# training state (no pickled objects: tensors and plain containers only, loaded weights_only)


def rng_state(device: torch.device | None = None) -> dict:
    """This rank's random state: CPU, Python, numpy, and its own GPU's (``device``) only, so that a
    resume where the rank sees another number of GPUs (or another index) restores it."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """``rng_state``'s inverse; the GPU state goes to this rank's ``device``. (Checkpoints of
    earlier versions hold every visible GPU's state: this rank's is the one at its device's index.)"""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_tensors(obj, path: Path) -> None:
    torch.save(obj, path)


def load_tensors(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)
