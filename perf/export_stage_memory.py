"""Resident memory by stage of one export (issue 21: where an export's peak is).

A thread samples the process's RSS every 20 ms; each progress line of ``export_model``
closes a stage and reports the RSS then and the peak since the line before, and the same
for its anonymous part (``RssAnon``: memory the process owns; the rest is mapped files,
such as onnxruntime's external weights read in place, whose clean pages the kernel can
drop under pressure). The source is
a random-weight checkpoint of Qwen3-0.6B's shape (``perf/bench_export.py``'s), written once
into ``--work``.

    PYTHONPATH=$PWD .venv/bin/python perf/export_stage_memory.py --target coreml \\
        --out perf/results/export_stage_memory_coreml.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "perf"))


def rss_mb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    return 0


def anon_mb() -> int:
    return rss_mb("RssAnon")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", choices=["onnx", "coreml"], default="coreml")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fermi-export-mem")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from bench_export import qwen3_shape

    from export.build import ExportOptions, export_model

    source = args.work / "qwen3-0.6b"
    if not source.exists():
        qwen3_shape(source)
    peak = {"mb": rss_mb(), "anon": anon_mb()}

    def sample() -> None:
        while True:
            peak["mb"] = max(peak["mb"], rss_mb())
            peak["anon"] = max(peak["anon"], anon_mb())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    lines = []

    def progress(line: str) -> None:
        row = {
            "t_s": round(time.perf_counter() - started, 1),
            "rss_mb": rss_mb(),
            "peak_since_last_line_mb": peak["mb"],
            "anon_mb": anon_mb(),
            "anon_peak_since_last_line_mb": peak["anon"],
            "line": line.strip(),
        }
        lines.append(row)
        print(json.dumps(row), flush=True)
        peak["mb"], peak["anon"] = row["rss_mb"], row["anon_mb"]

    options = ExportOptions(
        model=str(source),
        target=args.target,
        out=args.work / f"out-{args.target}-{args.quantize}",
        dtype=args.dtype,
        quantize=args.quantize,
        max_seq_len=2048,
    )
    export_model(options, progress=progress)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": "random Qwen3-0.6B shape, float32 checkpoint",
        "target": args.target,
        "quantize": args.quantize,
        "stages": lines,
        "peak_mb": max(r["peak_since_last_line_mb"] for r in lines),
        "anon_peak_mb": max(r["anon_peak_since_last_line_mb"] for r in lines),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
