#!/usr/bin/env bash
# Packaged steps (FERMI_AOT=1, fermi/runners/packaged.py) on the GPU, in two device calls on
# one warm machine (it keeps /tmp between calls; carry .whl):
#   FERMI_REV=<commit> bash perf/aot_gpu.sh build   the GPU suite, the packaged-steps tests
#                                                   and a cold Qwen3-1.7B start that builds
#                                                   its packages into /tmp/aotc, side by
#                                                   side (~8 min; the cold start's time is
#                                                   taken on a shared machine)
#   bash perf/aot_gpu.sh warm                       the warm start from those packages, a
#                                                   plain cold + warm start for comparison,
#                                                   and aoti_step_gpu.py (a packaged decode
#                                                   step's replay time and memory against
#                                                   the compiled runner's graph)
# Logs and JSON under $OUT.
set -u
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
out=${OUT:-/tmp}
model=${AOT_MODEL:-Qwen3-1.7B}
starts=(python3 perf/start_phases.py --model "$model" --warmup first --cache /tmp/aotc)
case ${1:-} in
build)
    bash perf/gpu_tests.sh all >"$out/suite.txt" 2>&1 &
    suite=$!
    bash perf/gpu_tests.sh packaged tests/test_packaged_steps.py >"$out/packaged.txt" 2>&1 &
    tests=$!
    "${starts[@]}" --variants aot --phases cold --timeout 460 --out "$out/aot_cold.json" \
        >"$out/aot_cold.txt" 2>&1
    wait $suite $tests
    cat "$out/suite.txt" "$out/packaged.txt" "$out/aot_cold.txt"
    ls -la /tmp/aotc/aot/fermi/*/
    ;;
warm)
    "${starts[@]}" --variants aot --phases warm --timeout 200 --out "$out/aot_warm.json" \
        >"$out/aot_warm.txt" 2>&1
    cat "$out/aot_warm.txt"
    "${starts[@]}" --variants plain --timeout 200 --out "$out/plain_start.json" \
        >"$out/plain_start.txt" 2>&1
    cat "$out/plain_start.txt"
    timeout 300 python3 perf/aoti_step_gpu.py --model "$model" --out "$out/aoti_step.json" \
        >"$out/aoti_step.txt" 2>&1
    cat "$out/aoti_step.txt"
    ;;
*)
    echo "usage: $0 build|warm" >&2
    exit 2
    ;;
esac
