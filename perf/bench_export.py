"""Export benchmark on CPU: export time and artefact size per target, and decode tok/s of
the ONNX artefact (onnxruntime, CPU) against the torch CPU runner on the same weights.

The model is a small random Qwen3 (8 layers, hidden 512, GQA 8:4, head_dim 64) with the
tests' tiny tokenizer (vocab 453): speed does not depend on the values and nothing is
downloaded. Decode is timed through the Runner API (no sampling or detokenizing), after
a 32-token prefill per slot.

    PYTHONPATH=$PWD .venv/bin/python perf/bench_export.py --out perf/results/export_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

SMALL = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 1024,
}
SEQ, PROMPT, STEPS = 512, 32, 64
EXPORTS = [
    ("onnx", "fp32", "none"),
    ("onnx", "fp32", "int8"),
    ("coreml", "fp16", "none"),
    ("coreml", "fp16", "int4"),
]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decode_rate(runner, batch: int) -> float:
    """Decode tokens per second over STEPS steps of ``batch`` slots."""
    from export.verify import sample_prompt

    slots = list(range(batch))
    tokens = []
    for s in slots:
        logits = runner.prefill(s, sample_prompt(453, PROMPT, seed=s), 0)
        tokens.append(int(logits.argmax()))
    positions = [PROMPT] * batch
    start = time.perf_counter()
    for _ in range(STEPS):
        logits = runner.decode(slots, tokens, positions)
        tokens = logits.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    return batch * STEPS / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="for torch and onnxruntime")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from export.build import ExportOptions, export_model
    from fermi.loading import load_folder
    from fermi.runners.artefact import read_manifest
    from fermi.runners.onnx import OnnxRunner
    from fermi.runners.torch_eager import TorchRunner
    from tests.tiny import write_checkpoint

    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "threads": args.threads,
        },
        "model": {**SMALL, "vocab_size": 453},
        "max_seq_len": SEQ,
        "prompt": PROMPT,
        "steps": STEPS,
        "exports": [],
        "decode_tok_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        source = write_checkpoint(Path(tmp) / "small", SMALL, seed=0)
        results["model"]["params"] = sum(
            p.numel()
            for p in load_folder(source, torch.device("cpu"), torch.float32).model.parameters()
        )
        folders = {}
        for target, dtype, quantize in EXPORTS:
            out = Path(tmp) / f"{target}-{dtype}-{quantize}"
            start = time.perf_counter()
            export_model(
                ExportOptions(
                    str(source),
                    target,
                    out,
                    dtype=dtype,
                    max_seq_len=SEQ,
                    quantize=quantize,
                    verify=False,
                ),
                progress=lambda line: None,
            )
            seconds = time.perf_counter() - start
            size = folder_size(out) - sum(
                (out / f).stat().st_size
                for f in (
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "config.json",
                    "generation_config.json",
                    "manifest.json",
                )
                if (out / f).exists()
            )
            results["exports"].append(
                {
                    "target": target,
                    "dtype": dtype,
                    "quantize": quantize,
                    "export_s": round(seconds, 1),
                    "model_bytes": size,
                }
            )
            folders[(target, quantize)] = out
            print(results["exports"][-1], flush=True)
        for batch in (1, 4):
            model = load_folder(source, torch.device("cpu"), torch.float32).model
            with torch.inference_mode():
                rates = {"torch-cpu fp32": decode_rate(TorchRunner(model, batch, SEQ), batch)}
            for quantize in ("none", "int8"):
                folder = folders[("onnx", quantize)]
                manifest = read_manifest(folder)
                runner = OnnxRunner(folder, manifest, batch, SEQ, 512, threads=args.threads)
                rates[f"onnx {'fp32' if quantize == 'none' else 'int8'}"] = decode_rate(
                    runner, batch
                )
            results["decode_tok_s"][f"batch {batch}"] = {k: round(v, 1) for k, v in rates.items()}
            print(batch, results["decode_tok_s"][f"batch {batch}"], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
