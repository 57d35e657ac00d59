#!/usr/bin/env python3
"""What verifying shards against their manifest costs: every row of prepared shards planned (read,
shuffle, no-duplicates; no tokenizing), with the sha256 pass-through training uses and with it
removed, alternating runs.

    python benchmarks/shard_verify.py SHARD_DIR [--repeats 3]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

from dist_embed.data import shards
from dist_embed.data.loader import PlanSpec
from dist_embed.data.readers import Source
from dist_embed.data.rows import Schema

VERIFIED = shards._Verified


class Unverified(VERIFIED):
    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def check(self) -> None:
        pass


def plan_rate(path: str) -> float:
    spec = PlanSpec(Source(path), Schema.for_loss("mnrl"), {}, "raise", 42, 128, True, 10_000, True, None)
    t0 = time.perf_counter()
    rows = sum(len(b) for b in spec.batches(0))
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rates = {"verified": [], "unverified": []}
    for rep in range(args.repeats):
        for name, cls in (("verified", VERIFIED), ("unverified", Unverified)):
            shards._Verified = cls
            rates[name].append(plan_rate(args.shards))
            print(f"{name:>10} run {rep + 1}: {rates[name][-1]:,.0f} rows/s", flush=True)
    shards._Verified = VERIFIED
    files = sorted(Path(args.shards).glob("*.tar"))
    t0 = time.perf_counter()
    size = 0
    for f in files:
        data = f.read_bytes()
        size += len(data)
        hashlib.sha256(data).hexdigest()
    print(f"median: verified {statistics.median(rates['verified']):,.0f}, unverified "
          f"{statistics.median(rates['unverified']):,.0f} rows/s; sha256 of {size / 1e6:.0f} MB alone: "
          f"{time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
