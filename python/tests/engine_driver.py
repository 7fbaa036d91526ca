"""Runs one vLLM engine (LLM) in its own process and serves commands from the test.

Usage: python engine_driver.py CONFIG.json

The config names the model directory, dtype, block size, the KV transfer config (or null for
no connector) and extra LLM arguments. Commands arrive as JSON lines on stdin; each answer is
one stdout line starting with ``@@kvshare@@ `` (vLLM prints its own lines there too).

Commands:
  {"op": "generate", "prompts": [[ids...], ...], "max_tokens": N, "cache_salt": str|null,
   "reset_prefix_cache": bool}
      -> {"outputs": [{"tokens": [...], "logprobs": [...], "num_cached_tokens": n,
                       "seconds": s}, ...]}
      Prompts run one at a time, so every run schedules the same batches.
  {"op": "exit"}
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

MARK = "@@kvshare@@ "


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {
        "model": cfg["model"],
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "dtype": cfg.get("dtype", "bfloat16"),
        "block_size": cfg.get("block_size", 32),
        "max_model_len": cfg.get("max_model_len", 2048),
        "seed": 0,
    }
    if cfg.get("kv_transfer_config") is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**cfg["kv_transfer_config"])
    kwargs.update(cfg.get("llm_kwargs", {}))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    reply({"ready": True, "startup_seconds": time.perf_counter() - t0})

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "generate":
            sp = SamplingParams(
                temperature=0.0,
                max_tokens=int(cmd.get("max_tokens", 8)),
                logprobs=0,
                ignore_eos=True,
                detokenize=False,
            )
            outs = []
            for ids in cmd["prompts"]:
                if cmd.get("reset_prefix_cache"):
                    llm.reset_prefix_cache()
                prompt: dict[str, Any] = {"prompt_token_ids": ids}
                if cmd.get("cache_salt"):
                    prompt["cache_salt"] = cmd["cache_salt"]
                t = time.perf_counter()
                (res,) = llm.generate([prompt], sp, use_tqdm=False)
                dt = time.perf_counter() - t
                comp = res.outputs[0]
                lps = []
                for tok, lp in zip(comp.token_ids, comp.logprobs or [], strict=False):
                    lps.append(lp[tok].logprob)
                outs.append(
                    {
                        "tokens": list(comp.token_ids),
                        "logprobs": lps,
                        "num_cached_tokens": res.num_cached_tokens,
                        "seconds": dt,
                    }
                )
            reply({"outputs": outs})
        else:
            reply({"error": f"unknown op {op}"})
    reply({"bye": True})


if __name__ == "__main__":
    main()
