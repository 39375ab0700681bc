"""Resident memory of the CPU engine (SmolLM2-135M), each stage in a fresh process.

Stages: ``import torch`` alone; ``import fermi`` + ``fermi.load("smollm2-135m", device="cpu")``
(default max_batch 8 and max_seq_len, and max_batch 1, also with ``warm_grammars=False``;
and max_batch 8 with ``quantize="int4"`` (the file's Q4_1 codes kept) and ``"int8"``);
then one 128-token prompt with 64 new tokens; then 1.5 s idle (an engine that warms its
grammars builds llguidance's view of the tokenizer then). For each: RSS after the stage and
the process's peak (VmHWM). Beside them, what the model needs: its weights as stored
(``state`` below: parameters, buffers and the FBGEMM packs) and the KV cache as allocated
(the full max_batch x max_seq_len) and as a 192-token sequence uses it.

    .venv/bin/python perf/mem_cpu.py --out perf/results/cpu_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out
import torch
after_torch = status()
result = {"import torch": after_torch}
stage = sys.argv[1]
if stage != "torch":
    sys.path.insert(0, sys.argv[2])
    import fermi
    from fermi.models.half_weights import HalfWeightLinear
    max_batch, _, mode = stage.partition(":")
    mode, _, quantize = mode.partition(":")
    warm = mode != "no-warm"
    engine = fermi.load(
        "smollm2-135m",
        device="cpu",
        max_batch=int(max_batch),
        warm_grammars=warm,
        quantize=quantize or None,
    )
    result["loaded"] = status()
    model = engine.runner.model
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    caches = [layer.self_attn.cache for layer in model.model.layers]
    cache_ids = {id(t) for c in caches for t in (c.k, c.v)}
    packed = sum(
        2 * m.out_features * m.in_features
        for m in model.modules()
        if isinstance(m, HalfWeightLinear) and getattr(m, "packed", False)
    )
    state = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in cache_ids)
    cache = sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v))
    c0 = caches[0]
    per_token = 2 * len(caches) * c0.k.shape[1] * c0.k.shape[3] * c0.k.element_size()
    result["model_mb"] = {
        "weights (parameters, buffers, fp16 packs)": round((state + packed) / 2**20, 1),
        "kv cache allocated": round(cache / 2**20, 1),
        "kv cache of one 192-token sequence": round(per_token * 192 / 2**20, 1),
        "max_seq_len": c0.k.shape[2],
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (128,), generator=g).tolist()
    engine.generate(prompt_token_ids=ids, max_tokens=64, temperature=0, ignore_eos=True)
    result["after 128 + 64 tokens"] = status()
    import time
    time.sleep(1.5)  # idle past IDLE_WORK_AFTER_S: a warming engine builds the grammar view
    engine.grammars.wait_prepared()
    result["idle 1.5 s later"] = status()
    result["grammar view built"] = engine.grammars._tok is not None
    engine.close()
print(json.dumps(result))
"""


def run(stage: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, stage, str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--label", default="", help="what tree was measured (a commit)")
    args = p.parse_args()
    result = {
        "command": " ".join(sys.argv),
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stages_mb": {
            "torch": run("torch"),
            "max_batch 8": run("8"),
            "max_batch 1": run("1"),
            "max_batch 1, warm_grammars=False": run("1:no-warm"),
            "max_batch 8, quantize int4": run("8::int4"),
            "max_batch 8, quantize int8": run("8::int8"),
        },
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
