"""The CPU's multiply throughput: the ceiling of a batched decode step's products.

Compiles a small C program (``-O2 -march=native -fopenmp``) whose loops issue one
multiply-add instruction on 12 independent accumulators (no loads, so nothing but the
instruction's own throughput bounds them), and times each loop on 1 thread and on every
thread at once (``--threads``, default: the CPU count). Reported per thread: instructions
per second and multiply-adds per second for

- ``vpdpwssd zmm`` (AVX-512 VNNI: 16 lanes x 2 int16 pairs, fermi's int8/int4 products),
- ``vpmaddwd + vpaddd zmm`` (AVX-512 BW without VNNI: the same sums in two instructions),
- ``vpdpbusd zmm`` (16 x 4 uint8 x int8: the 8-bit inputs run 72 rejected),
- ``vfmadd231ps zmm`` (16 float32: fermi's fp16 products after widening),

and the ymm forms on AVX2 machines. A loop the CPU lacks is left out.

    .venv/bin/python perf/cpu_dot_peak.py --out perf/results/cpu_dot_peak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define LOOP(NAME, TYPE, INIT, ASM, MACS)                                                  \
    static void NAME(long n, int threads) {                                                \
        double began = omp_get_wtime();                                                    \
        _Pragma("omp parallel num_threads(threads)") {                                     \
            TYPE a = INIT, b = INIT, c[12];                                                \
            for (int j = 0; j < 12; j++) c[j] = INIT;                                      \
            for (long i = 0; i < n; i++) {                                                 \
                REP12(ASM)                                                                 \
            }                                                                              \
            volatile TYPE sink = c[0];                                                     \
            for (int j = 1; j < 12; j++) sink = c[j];                                      \
            (void)sink;                                                                    \
        }                                                                                  \
        double s = omp_get_wtime() - began;                                                \
        printf("{\"loop\": \"%s\", \"threads\": %d, \"instr_per_s\": %.4g, "              \
               "\"macs_per_s\": %.4g}\n", #NAME, threads, 12.0 * n / s,                    \
               12.0 * n / s * (MACS));                                                     \
    }

#if defined(__AVX512VNNI__)
#define DPWSSD(j) __asm__ volatile("vpdpwssd %1, %2, %0" : "+v"(c[j]) : "v"(a), "v"(b));
LOOP(vpdpwssd_zmm, __m512i, _mm512_set1_epi32(1), DPWSSD, 32)
#define DPBUSD(j) __asm__ volatile("vpdpbusd %1, %2, %0" : "+v"(c[j]) : "v"(a), "v"(b));
LOOP(vpdpbusd_zmm, __m512i, _mm512_set1_epi32(1), DPBUSD, 64)
#endif
#if defined(__AVX512BW__)
#define MADDWD(j) __asm__ volatile("vpmaddwd %1, %2, %%zmm31\n\tvpaddd %%zmm31, %0, %0"   \
                                   : "+v"(c[j]) : "v"(a), "v"(b) : "xmm31");
LOOP(vpmaddwd_vpaddd_zmm, __m512i, _mm512_set1_epi32(1), MADDWD, 32)
#endif
#if defined(__AVX512F__)
#define FMA512(j) __asm__ volatile("vfmadd231ps %1, %2, %0" : "+v"(c[j]) : "v"(a), "v"(b));
LOOP(vfmadd231ps_zmm, __m512, _mm512_set1_ps(1e-9f), FMA512, 16)
#endif
#define FMA256(j) __asm__ volatile("vfmadd231ps %1, %2, %0" : "+x"(c[j]) : "x"(a), "x"(b));
LOOP(vfmadd231ps_ymm, __m256, _mm256_set1_ps(1e-9f), FMA256, 8)
#define MADD256(j) __asm__ volatile("vpmaddwd %1, %2, %%ymm15\n\tvpaddd %%ymm15, %0, %0"   \
                                    : "+x"(c[j]) : "x"(a), "x"(b) : "xmm15");
LOOP(vpmaddwd_vpaddd_ymm, __m256i, _mm256_set1_epi32(1), MADD256, 16)

int main(int argc, char **argv) {
    long n = 50000000;
    int all = argc > 1 ? atoi(argv[1]) : omp_get_num_procs();
    int counts[2] = {1, all};
    for (int i = 0; i < (all > 1 ? 2 : 1); i++) {
        int t = counts[i];
#if defined(__AVX512VNNI__)
        vpdpwssd_zmm(n, t);
        vpdpbusd_zmm(n, t);
#endif
#if defined(__AVX512BW__)
        vpmaddwd_vpaddd_zmm(n / 2, t);
#endif
#if defined(__AVX512F__)
        vfmadd231ps_zmm(n, t);
#endif
        vfmadd231ps_ymm(n, t);
        vpmaddwd_vpaddd_ymm(n / 2, t);
    }
    return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cc = os.environ.get("CC") or "cc"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run(
            [cc, "-O2", "-march=native", "-fopenmp", "-o", str(exe), str(src)], check=True
        )
        runs = []
        for _ in range(args.rounds):
            done = subprocess.run(
                [str(exe), str(args.threads)], capture_output=True, text=True, check=True
            )
            runs += [json.loads(line) for line in done.stdout.splitlines()]
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        per = table.setdefault(r["loop"], {}).setdefault(
            f"{r['threads']} threads", {"instr_per_s_per_thread": [], "macs_per_s_per_thread": []}
        )
        per["instr_per_s_per_thread"].append(round(r["instr_per_s"] / r["threads"] / 1e9, 3))
        per["macs_per_s_per_thread"].append(round(r["macs_per_s"] / r["threads"] / 1e9, 1))
    result = {
        "command": "perf/cpu_dot_peak.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "units": "G instructions and G multiply-adds per second per thread, one per round",
        "loops": table,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
