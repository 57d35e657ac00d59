"""Run outputs for people and tools: metrics.jsonl, the console progress, timers."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("dist_embed")


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is written, not the one it was made with
    (a caller that redirects stderr, or closes the stream it had, still gets every line)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Rank 0 logs at INFO, the others only warnings, each line tagged with the rank."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    for noisy in ("transformers", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # the per-file "Loading weights" bars are noise in cluster logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v  # JSON has no NaN; null means "undefined"
    return v


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only; flushed per line)."""

    def __init__(self, path: Path | None, sink=None):
        self.path = path
        self.sink = sink  # e.g. a WandbRun: gets every record too
        self._f = open(path, "a", encoding="utf-8") if path else None

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()
        if self.sink is not None:
            self.sink.log(record)

    def close(self) -> None:
        if self._f:
            self._f.close()


class Progress:
    """A tqdm bar on an interactive rank 0; plain periodic log lines in cluster logs."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int):
        self.enabled, self.every, self.total = enabled, every, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.start_step = initial

    def update(self, step: int, info: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                                 refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            done = max(step - self.start_step, 1)
            eta = elapsed / done * max(self.total - step, 0)
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            log.info("step %d/%d %s eta=%s", step, self.total, parts, _fmt_secs(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_secs(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Timer:
    """Accumulates seconds per phase (data, compute, comm) over a logging window."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def read_all(values: list) -> list:
    """Plain numbers for ``values`` (device tensors, numbers or None): every tensor is read back in
    one transfer, the one wait for the device a training step has, on log steps only."""
    import torch

    idx = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    out = list(values)
    if idx:
        device = values[idx[0]].device
        got = torch.stack([values[i].detach().reshape(()).to(device, torch.float64) for i in idx]).tolist()
        for i, v in zip(idx, got):
            out[i] = v
    return out


PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(device) -> float | None:
    """The GPU's dense bf16/fp16 tensor-core peak (vendor datasheets), None where unknown (CPU)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)  # "H100 PCIe" first


class Window:
    """What happened since the last log line: loss, rows, tokens, time; one metrics record.
    ``flops_per_token``: 6 x parameters (all, and without the embedding tables) for MFU against the
    device's ``peak`` FLOP/s."""

    def __init__(self, flops_per_token: tuple[float, float] | None = None, peak: float | None = None):
        self.flops, self.peak = flops_per_token, peak
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.samples, self.real, self.padded = 0.0, 0, 0, 0, 0
        self.steps = 0  # steps timed in this window by this process (n may hold a resumed run's too)
        self.by_dataset: dict[int, list] = {}  # dataset -> [local loss sum, micro-batches with a finite loss]
        self.t0 = time.perf_counter()

    def add_batch(self, batch, local_loss=float("nan")) -> None:
        """A micro-batch's tokens and its local loss (a device tensor is summed on the device)."""
        import torch

        self.real += batch.real_tokens
        self.padded += batch.padded_tokens
        acc = self.by_dataset.setdefault(batch.dataset, [0.0, 0])
        if isinstance(local_loss, torch.Tensor):
            finite = torch.isfinite(local_loss)
            acc[0] = acc[0] + torch.where(finite, local_loss, 0.0)
            acc[1] = acc[1] + finite.to(torch.int64)
        elif math.isfinite(local_loss):
            acc[0] += local_loss
            acc[1] += 1

    def add_step(self, loss: float, rows: int) -> None:
        self.samples += rows
        self.steps += 1
        if math.isfinite(loss):
            self.loss += loss
            self.n += 1

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.t0, 1e-9)

    def record(self, state, timer: "Timer", datasets: tuple = ()) -> dict | None:
        """The window as a metrics record (all ranks call it: tokens and memory are summed/maxed
        over ranks), then a fresh window; None if no step finished in it. With several
        ``datasets``: ``loss/<name>``, the mean loss of that dataset's batches (every rank draws
        from the same dataset at each micro-batch, so the per-rank sums add up)."""
        from ..distributed import all_reduce_sum

        if not self.n:
            return None
        elapsed = time.perf_counter() - self.t0
        per = [self.by_dataset.get(i, [0.0, 0]) for i in range(len(datasets))] if len(datasets) > 1 else []
        local = read_all([x for p in per for x in p])  # [sum, count] per dataset, this rank
        real, padded, *sums = all_reduce_sum([self.real, self.padded, *local[0::2]], state)
        counts = local[1::2]  # every rank draws the same datasets: its own count is the count
        phases = timer.pop()
        gather = phases.pop("gather", 0.0)
        total = sum(phases.values()) or 1.0
        rec = {"loss": self.loss / self.n, "samples_per_second": self.samples / elapsed,
               "tokens_per_second": real / elapsed, "padding_ratio": 1 - real / max(padded, 1),
               "seconds_per_step": elapsed / max(self.steps, 1), "gather_seconds_per_step": gather / max(self.steps, 1)}
        if self.flops and self.peak:
            rec["mfu"] = rec["tokens_per_second"] * self.flops[0] / (self.peak * state.world_size)
            rec["mfu_non_embedding"] = rec["tokens_per_second"] * self.flops[1] / (self.peak * state.world_size)
        rec.update({f"loss/{name}": total_loss / n for name, total_loss, n in zip(datasets, sums, counts) if n})
        rec.update({f"time/{k}": v / total for k, v in phases.items()})
        rec.update(peak_memory(state))
        self.reset()
        return rec


    def losses(self, state) -> dict:
        """The window's losses so far, for a checkpoint (all ranks call it: the per-dataset sums are
        summed over ranks): a resumed run's first record then averages the same steps."""
        from ..distributed import all_reduce_sum

        names = sorted(self.by_dataset)
        local = read_all([x for d in names for x in self.by_dataset[d]])
        sums = all_reduce_sum(local[0::2], state) if names else []
        return {"loss": self.loss, "n": self.n,
                "datasets": {str(d): [s, c] for d, s, c in zip(names, sums, local[1::2])}}

    def restore_losses(self, saved: dict | None, is_main: bool) -> None:
        """The losses a checkpoint's window held (``losses``); rank 0 holds the datasets' sums."""
        if not saved:
            return
        self.loss, self.n = saved["loss"], saved["n"]
        self.by_dataset = {int(d): [s if is_main else 0.0, c] for d, (s, c) in saved["datasets"].items()}


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux; 0 where /proc is missing)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_memory(state, before_model: float | None = None) -> dict[str, float]:
    """Peak memory of the largest process so far, MiB: host RSS, and GPU memory allocated on CUDA.
    ``before_model``: this rank's RSS before the model was built (libraries, process group), so the
    model's own share shows as peak - before (the closing record carries it)."""
    import resource

    import torch

    from ..distributed import all_reduce_sum

    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # Linux reports KiB
    if before_model is not None:
        values.append(before_model)
    if state.device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(state.device) / 2**20)
    values = all_reduce_sum(values, state, op=torch.distributed.ReduceOp.MAX)
    out = {"mem/peak_rss_mib": round(values.pop(0), 1)}
    if before_model is not None:
        out["mem/rss_before_model_mib"] = round(values.pop(0), 1)
    if values:
        out["mem/peak_gpu_mib"] = round(values[0], 1)
    return out
