"""Export cost per target on the CPU: wall time (and each stage's), peak memory and
artefact size, with the export's own numerics check (its figures are the source-vs-export
agreement the manifest records).

Models: SmolLM2-135M-Instruct through the ``smollm2-135m`` alias (the Q4_1 GGUF file: its
blocks are kept by int8/int4), the same weights written out as a float checkpoint folder
(so int8/int4 quantize them again, as they would a float model's), and a random-weight
checkpoint of Qwen3-0.6B's shape (``fermi.models.shapes``; its agreement figures mean
little, random logits are near-tied).
Each export runs in a process of its own, so its peak resident memory is its own (the
export's, including the check, which loads the source once more and the exported model).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python perf/bench_export.py \\
        --out perf/results/export_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {
    "smollm2-135m": [
        ("onnx", "fp32", "none"),
        ("onnx", "fp32", "int8"),
        ("onnx", "fp32", "int4"),
        ("coreml", "fp16", "none"),
        ("coreml", "fp16", "int8"),
        ("coreml", "fp16", "int4"),
    ],
    # SmolLM2's weights as a float checkpoint: quantizing them again is what int8 / int4
    # cost from float weights (the GGUF file's own blocks are kept instead, above).
    "smollm2-135m-float": [
        ("onnx", "fp32", "int8"),
        ("onnx", "fp32", "int4"),
        ("coreml", "fp16", "int8"),
        ("coreml", "fp16", "int4"),
    ],
    "qwen3-0.6b": [
        ("onnx", "fp32", "none"),
        ("onnx", "fp32", "int8"),
        ("coreml", "fp16", "none"),
        ("coreml", "fp16", "int4"),
    ],
}
CHILD = """
import json, resource, sys, time
from pathlib import Path
from export.build import ExportOptions, export_model

model, target, dtype, quantize, out = sys.argv[1:6]
lines = []
start = time.perf_counter()
manifest = export_model(
    ExportOptions(model=model, target=target, out=Path(out), dtype=dtype, quantize=quantize,
                  max_seq_len=2048),
    progress=lambda line: lines.append((time.perf_counter() - start, line)),
)
seconds = time.perf_counter() - start
size = sum((Path(out) / f).stat().st_size for f in manifest.files)
model_bytes = sum(
    (Path(out) / f).stat().st_size for f in manifest.files if f.startswith("model.")
)
print(json.dumps({
    "export_s": round(seconds, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "artefact_mb": round(size / 1e6, 1),
    "model_files_mb": round(model_bytes / 1e6, 1),
    "numerics": manifest.numerics.summary() if manifest.numerics else None,
    "top1_agreement": manifest.numerics.top1_agreement if manifest.numerics else None,
    "greedy_equal": manifest.numerics.greedy_equal if manifest.numerics else None,
    "progress": [f"{t:7.1f}s {line}" for t, line in lines],
}))
"""


def qwen3_shape(folder: Path) -> Path:
    from fermi.models.shapes import config
    from tests.tiny import write_checkpoint_for

    cfg = config("Qwen3-0.6B")
    cfg["torch_dtype"] = "float32"
    return write_checkpoint_for(folder, cfg, seed=0)


def smollm2_float(folder: Path) -> Path:
    """The alias's dequantized weights as a checkpoint folder our loader reads."""
    import torch
    from safetensors.torch import save_file

    from export.build import load_any, write_side_files

    checkpoint = load_any("smollm2-135m", torch.float32)
    folder.mkdir(parents=True)
    write_side_files(checkpoint, folder)
    state = {k: v.contiguous() for k, v in checkpoint.model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding (config.json says so)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def source_for(name: str, tmp: Path) -> str:
    if name == "smollm2-135m":
        return name
    if name == "smollm2-135m-float":
        return str(smollm2_float(tmp / name))
    return str(qwen3_shape(tmp / name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument(
        "--targets", nargs="+", default=["onnx", "coreml"], choices=["onnx", "coreml"]
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": os.getloadavg(),
            "note": "shared 2-core VM: other jobs ran meanwhile, so times are upper bounds",
        },
        "max_seq_len": 2048,
        "exports": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            source = source_for(name, Path(tmp))
            for target, dtype, quantize in TARGETS[name]:
                if target not in args.targets:
                    continue
                out = Path(tmp) / f"{name}-{target}-{quantize}"
                began = time.perf_counter()
                res = subprocess.run(
                    [sys.executable, "-c", CHILD, source, target, dtype, quantize, str(out)],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                )
                if res.returncode != 0:
                    raise SystemExit(f"{name} {target} {quantize} failed:\n{res.stderr[-3000:]}")
                row = {
                    "model": name,
                    "target": target,
                    "dtype": dtype,
                    "quantize": quantize,
                    **json.loads(res.stdout.strip().splitlines()[-1]),
                    "process_s": round(time.perf_counter() - began, 1),
                }
                results["exports"].append(row)
                print({k: v for k, v in row.items() if k != "progress"}, flush=True)
                # Written after every export: a long run keeps what it measured so far.
                results["machine"]["load_average_after"] = os.getloadavg()
                args.out.write_text(json.dumps(results, indent=2) + "\n")
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
