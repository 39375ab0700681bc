#!/usr/bin/env bash
# The GPU tests on the device machine, one log per group, under $OUT (see perf/README.md).
#   FERMI_REV=<commit> bash perf/gpu_tests.sh NAME "TEST FILES OR IDS" [NAME "TESTS" ...]
#   FERMI_REV=<commit> bash perf/gpu_tests.sh all      (the whole suite: six groups in four
#                                                       processes side by side, ~450 s on an H200)
# (FERMI_REV labels the logs: the device's copy of the tree does not know the commit sent.)
# Installs the carried wheels (.whl: msgspec, granian, llguidance, ... for cp312) once, then
# runs each group with pytest's summary on, timed, into $OUT/NAME.log; a failing group does
# not stop the next. Copies may run side by side on one GPU (`... & ... & ...; wait`). Exits
# non-zero if any group failed. (pytest's logging plugin is off, as in every GPU run so far:
# a test that needs caplog cannot run through this script.)
set -u
if [ "$*" = all ]; then
    self=${BASH_SOURCE[0]}
    bash "$self" split tests/test_split_decode.py \
        engine "tests/test_sampling.py tests/test_scheduler_overlap.py tests/test_core_review.py tests/test_row_kernels.py" \
        reuse "tests/test_prefix_reuse.py tests/test_slot_compaction.py tests/test_logit_bias.py" &
    first=$!
    bash "$self" runner "tests/test_torch_cuda_runner.py tests/test_cuda.py" &
    second=$!
    bash "$self" quant "tests/test_quant_cuda.py tests/test_grammar_cuda.py" &
    third=$!
    bash "$self" archs tests/test_cuda_archs.py
    status=$?
    for job in $first $second $third; do
        wait "$job" || status=1
    done
    exit $status
fi
if [ $(($# % 2)) -ne 0 ] || [ $# -eq 0 ]; then
    echo "usage: $0 NAME TESTS [NAME TESTS ...]" >&2
    exit 2
fi
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONFAULTHANDLER=1
status=0
while [ $# -ge 2 ]; do
    name=$1 tests=$2
    shift 2
    log=${OUT:-/tmp}/$name.log
    {
        echo "# ${FERMI_REV:-unlabelled tree}, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): $tests"
        date -u
    } >"$log"
    # shellcheck disable=SC2086  # the tests are words
    "${PYTHON:-python3}" -m pytest -p no:logging -p no:cacheprovider -o addopts="" -q -rfEs $tests >>"$log" 2>&1 || status=1
    echo "$name: $(tail -1 "$log")"
    date -u >>"$log"
done
exit $status
