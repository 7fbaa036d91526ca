"""TTFT of a vLLM engine B on a 4k-token prompt whose prefix engine A computed before:
no connector (cold), vLLM's ExampleConnector on a local directory, and KvshareConnector on a
local 3-node kvshare cluster (R=2). Every engine is its own process; A and B never share a
process. Model: random-weight Llama, 8 layers, d=1024, 16 query / 4 KV heads (GQA), bf16.

Two prompts for B, each measured three times (median), vLLM's local prefix cache reset before
every measurement so all reuse comes from the connector:

  shared90   B's prompt shares its first 90 % (3,686 tokens) with A's; the rest differs.
  identical  B's prompt is A's prompt (ExampleConnector only matches whole prompts: this is
             the case where the two connectors load the same amount, head to head).

KvshareConnector is measured once per codec (--codecs). Every engine runs with
VLLM_CPU_NUM_OF_RESERVED_CPU=1 (tests/conftest.py): vLLM's CPU backend otherwise reserves one
core fewer for engines without a connector, and cold would compute on fewer threads. kvshared
is target/release/kvshared when built (else KVSHARED_BIN, else the debug build).

Usage (from the repo root, in the vLLM venv, kvshared built):
    python python/bench/vllm_ttft.py [--out target/vllm-bench.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python/: tests.conftest

from tests.conftest import Cluster, Engine, connector_config, make_llama

LOADED = re.compile(
    r"loaded (\d+) blocks \((\d+) tokens\), (\d+) bytes on the wire for (\d+) raw "
    r"\([0-9.]+x\), ([0-9.]+) ms"
)


def prompts(n_tokens: int, shared_frac: float, reps: int) -> dict[str, Any]:
    rng = random.Random(42)
    shared = int(n_tokens * shared_frac)

    def t(n: int) -> list[int]:
        return [rng.randrange(100, 32000) for _ in range(n)]

    prefix = t(shared)
    identical = t(n_tokens)
    return {
        "warmup": t(256),
        "a_shared90": prefix + t(n_tokens - shared),
        # A fresh suffix per repetition: what B pushes in one repetition (its own suffix
        # blocks, or ExampleConnector's whole prompt) never helps the next one.
        "shared90": [prefix + t(n_tokens - shared) for _ in range(reps)],
        "identical": [identical] * reps,
    }


def measure(e: Engine, reps: list[list[int]]) -> dict[str, Any]:
    times, cached = [], []
    for prompt in reps:
        (o,) = e.generate([prompt], max_tokens=1, reset_prefix_cache=True)
        times.append(o["seconds"])
        cached.append(o["num_cached_tokens"])
    return {"ttft_s": statistics.median(times), "all_s": times, "cached_tokens": cached}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="target/vllm-bench.json")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--codecs", default="byteplane-zstd,byteplane-lz4,none",
                    help="kvshare codecs to measure (one engine pair each)")
    ap.add_argument("--quick", action="store_true", help="2 layers, 1k tokens, 1 rep (smoke)")
    args = ap.parse_args()
    release = Path(__file__).resolve().parents[2] / "target" / "release" / "kvshared"
    if "KVSHARED_BIN" not in os.environ and release.is_file():
        os.environ["KVSHARED_BIN"] = str(release)
    work = Path(tempfile.mkdtemp(prefix="kvshare-vllm-bench-"))
    layers, n_tokens, reps = 8, args.tokens, args.reps
    if args.quick:
        layers, n_tokens, reps = 2, 1024, 1
    model = make_llama(work / "model", dtype="bfloat16", num_kv_heads=4, layers=layers,
                       hidden=1024, heads=16, vocab=32000)
    p = prompts(n_tokens, 0.9, reps)
    base = {
        "model": str(model),
        "dtype": "bfloat16",
        "block_size": 64,
        "max_model_len": n_tokens + 256,
        "llm_kwargs": {"max_num_batched_tokens": n_tokens + 256},
    }
    cluster = Cluster(capacity="4GiB").start()
    results: dict[str, Any] = {
        "model": {"layers": layers, "hidden": 1024, "heads": 16, "kv_heads": 4,
                  "dtype": "bf16", "block_size": 64},
        "prompt_tokens": n_tokens,
        "shared_tokens": int(n_tokens * 0.9),
        "modes": {},
    }
    example_dir = work / "example-connector"
    example_dir.mkdir()
    modes: dict[str, dict[str, Any] | None] = {
        "cold": None,
        "example": {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(example_dir)},
        },
    }
    for codec in args.codecs.split(","):
        # Own namespace per codec: blocks pushed in one mode never serve another.
        modes[f"kvshare[{codec}]"] = connector_config(
            cluster.endpoints, codec=codec, namespace_salt=f"bench-{codec}"
        )
    try:
        for mode, conn in modes.items():
            cfg = dict(base, kv_transfer_config=conn)
            t0 = time.perf_counter()
            if conn is not None:
                a = Engine(cfg, work / f"A-{mode}.log")
                a.generate([p["a_shared90"]], max_tokens=1)
                a.generate([p["identical"][0]], max_tokens=1)
                a.close()  # kvshare: shutdown flushes the pushes
            b = Engine(cfg, work / f"B-{mode}.log")
            b.generate([p["warmup"]], max_tokens=1)
            b.generate([p["warmup"]], max_tokens=1, reset_prefix_cache=True)
            r = {name: measure(b, p[name]) for name in ("shared90", "identical")}
            b.close()
            log = b.log()
            loads = LOADED.findall(log)
            if loads:
                r["loads"] = len(loads)
                r["wire_bytes_per_load"] = int(loads[-1][2])
                r["raw_bytes_per_load"] = int(loads[-1][3])
                r["load_ms"] = [float(x[4]) for x in loads]
            r["wall_s"] = time.perf_counter() - t0
            results["modes"][mode] = r
            print(mode, json.dumps(r), flush=True)
    finally:
        cluster.stop()
    m = results["modes"]
    for name in ("shared90", "identical"):
        cold = m["cold"][name]["ttft_s"]
        for mode in m:
            m[mode][name]["speedup_vs_cold"] = cold / m[mode][name]["ttft_s"]
    results["example_over_kvshare_identical"] = {
        mode: m["example"]["identical"]["ttft_s"] / m[mode]["identical"]["ttft_s"]
        for mode in m
        if mode.startswith("kvshare")
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print("| B's prompt | mode | TTFT (median) | cached tokens | vs cold |")
    print("|---|---|---|---|---|")
    for name in ("shared90", "identical"):
        for mode in m:
            r = m[mode][name]
            print(f"| {name} | {mode} | {r['ttft_s'] * 1e3:.0f} ms | {r['cached_tokens'][-1]} | "
                  f"{r['speedup_vs_cold']:.2f}x |")
    for mode in m:
        k = m[mode]
        if "raw_bytes_per_load" in k:
            print(f"{mode}: {k['wire_bytes_per_load']} bytes on the wire for "
                  f"{k['raw_bytes_per_load']} raw per load "
                  f"({k['raw_bytes_per_load'] / k['wire_bytes_per_load']:.2f}x), "
                  f"load times {k['load_ms']} ms")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
