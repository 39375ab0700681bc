#!/usr/bin/env bash
# LOG run 76's device call on a tree WITH perf/patches/int4_row_words.patch applied, in one
# command: the whole GPU suite, then the kernel's products against the tree without it and
# Qwen3-8B int4 decode with and without it.
#   FERMI_REV=<commit> bash perf/int4_land.sh        (carry .whl; about 9 minutes on an H200)
# Into $OUT: the suite's logs (perf/gpu_tests.sh all; first: landing needs it), then
# gemv_old.json / gemv_new.json (Qwen3-8B's int4 one-row products, each tree at its launch
# rule, on the GPU the suite has left), decode_new.json / decode_old.json (batch 1, prompt
# 128, three runs), then sweep.json (the patched kernel's launches over Qwen3-8B's
# products; last, so the call's limit cuts only the measurements). The tree without the patch is made under /tmp by reversing it.
set -u
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
out=${OUT:-/tmp/int4_land}
mkdir -p "$out"
new=$PWD old=/tmp/int4_words_old
patched_copy "$old" perf/patches/int4_row_words.patch unapply_patch || exit 1
export PYTHONUNBUFFERED=1
echo "# ${FERMI_REV:-unlabelled tree}, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
date -u
OUT=$out bash perf/gpu_tests.sh all
status=$?
date -u
for side in old new; do
    dir=$old
    [ $side = new ] && dir=$new
    in_tree "$dir" python3 perf/micro_gemv_quant.py --models Qwen3-8B --rows --schemes int4 \
        --out "$out/gemv_$side.json" | cut -c1-240
done
date -u
for side in new old; do
    dir=$old
    [ $side = new ] && dir=$new
    in_tree "$dir" python3 perf/bench_decode.py --models Qwen3-8B --skip-hf --prompts 128 \
        --batches 1 --runs 3 --new-tokens 128 --quantize int4 \
        --out "$out/decode_$side.json" 2>&1 | grep "tok/s\|rror"
done
date -u
in_tree "$new" python3 perf/micro_gemv_quant.py --models Qwen3-8B --rows --schemes int4 \
    --sweep --out "$out/sweep.json" 2>"$out/sweep_stderr.txt" | cut -c1-240
date -u
exit $status
