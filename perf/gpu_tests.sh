#!/usr/bin/env bash
# The GPU tests on the device machine, one log per group, under $OUT (see perf/README.md).
#   FERMI_REV=<commit> bash perf/gpu_tests.sh NAME "TEST FILES OR IDS" [NAME "TESTS" ...]
# (FERMI_REV labels the logs: the device's copy of the tree does not know the commit sent.)
# Installs the carried wheels (.whl: msgspec, granian, llguidance, ... for cp312) once, then
# runs each group with pytest's summary on, timed, into $OUT/NAME.log; a failing group does
# not stop the next. Exits non-zero if any group failed.
set -u
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
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
    python3 -m pytest -p no:logging -p no:cacheprovider -o addopts="" -q -rfEs $tests >>"$log" 2>&1 || status=1
    date -u >>"$log"
    tail -1 "$log"
done
exit $status
