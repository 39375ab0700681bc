#!/usr/bin/env bash
# Programmatic dependent launch for the row products (fermi.models.gemv, FERMI_PDL), one
# device call (carry .whl):
#   bash perf/pdl_ab.sh [MODEL ...]        (default: Qwen3-0.6B Qwen3-1.7B)
#   PDL_AB_TESTS=0 bash perf/pdl_ab.sh     (without the tests, after the GPU suite ran them)
# First the kernels' GPU tests (tests/test_row_kernels.py: plain and PDL launches against
# the reference, a PDL chain in one CUDA graph with poisoned buffers, the compiled runner
# with and without; the int8/int4 kernel tests of tests/test_quant_cuda.py with both), then
# per model bench_decode.py at batch 1 with FERMI_PDL=0 and =1 in fresh processes, in turn
# (0, 1, then 1, 0 again while the call has time), each line saying whether the runner used
# PDL (a warm-up that failed with it falls back silently). Writes $OUT/pdl_tests.log and
# $OUT/pdl_<model>_<flag>_<round>.json.
set -u
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
out=${OUT:-/tmp}
start=$SECONDS
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(Qwen3-0.6B Qwen3-1.7B)
if [ "${PDL_AB_TESTS:-1}" = 1 ]; then  # (0: the GPU suite just ran them)
    python3 -m pytest -p no:logging -p no:cacheprovider -o addopts="" -q -rfEs \
        tests/test_row_kernels.py tests/test_quant_cuda.py -k "not engine_on_the_gpu" \
        >"$out/pdl_tests.log" 2>&1
    echo "tests: $(tail -1 "$out/pdl_tests.log") ($((SECONDS - start)) s)"
fi
for round in 1 2; do
    order="0 1"
    [ $round -eq 2 ] && order="1 0"
    for model in "${models[@]}"; do
        for flag in $order; do
            if [ $((SECONDS - start)) -gt "${PDL_AB_BUDGET_S:-470}" ]; then
                echo "stopped before $model FERMI_PDL=$flag round $round: time"
                exit 0
            fi
            json=$out/pdl_${model}_${flag}_${round}.json
            FERMI_PDL=$flag python3 perf/bench_decode.py --models "$model" --skip-hf \
                --prompts 128 --batches 1 --runs 3 --new-tokens 128 --out "$json" \
                >"${json%.json}.log" 2>&1
            used=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['models'][0]['ours_start'].get('pdl'))" "$json" 2>/dev/null)
            echo "$model FERMI_PDL=$flag (runner.pdl $used) round $round: $(grep -o 'ours p128: [^,]*' "${json%.json}.log") ($((SECONDS - start)) s)"
        done
    done
done
