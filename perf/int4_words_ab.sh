#!/usr/bin/env bash
# LOG run 76's device call, in one command: the int4 one-row kernel of
# perf/patches/int4_row_words.patch against the tree as sent, on one GPU.
#   FERMI_REV=<commit> bash perf/int4_words_ab.sh        (carry .whl; about 8 minutes)
# Into $OUT: int4_tests.log (the quantized GPU tests on the patched tree), gemv_old.json /
# gemv_new.json (Qwen3-8B's int4 products at each tree's launch rule), decode_old.json /
# decode_new.json (Qwen3-8B batch-1 decode: bf16 and int4 at the sent tree, int4 patched),
# sweep.json (the patched kernel's launch configurations over Qwen3-8B's and 1.7B's
# products, each checked against the float product; the new launch rule comes from it;
# last, so the call's limit cuts only it). The sent tree is left unpatched: the patched copy
# is made under /tmp.
set -u
# The patch is applied by `patch`, else by `git apply` (device_wheels.sh's apply_patch);
# with neither, stop before spending anything.
if ! command -v patch >/dev/null && ! command -v git >/dev/null; then
    echo "neither patch nor git here: send a tree with the patch applied instead" >&2
    exit 2
fi
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
out=${OUT:-/tmp/int4_words_ab}
mkdir -p "$out"
old=$PWD new=/tmp/int4_words_new
patched_copy "$new" perf/patches/int4_row_words.patch apply_patch || exit 1
export PYTHONUNBUFFERED=1
{
    echo "# ${FERMI_REV:-unlabelled tree} + patches/int4_row_words.patch," \
        "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    date -u
    in_tree "$new" python3 -m pytest -p no:logging -p no:cacheprovider -o addopts="" -q -rfEs \
        tests/test_quant_cuda.py tests/test_row_kernels.py
    date -u
} >"$out/int4_tests.log" 2>&1
echo "tests: $(tail -2 "$out/int4_tests.log" | head -1)"
for side in old new; do
    dir=$old schemes="none int4"  # bf16 once: the patch changes only the int4 kernel
    [ $side = new ] && dir=$new schemes=int4
    in_tree "$dir" python3 perf/micro_gemv_quant.py --models Qwen3-8B --rows --schemes int4 \
        --out "$out/gemv_$side.json" | cut -c1-240
    # shellcheck disable=SC2086  # the schemes are words
    in_tree "$dir" python3 perf/bench_decode.py --models Qwen3-8B --skip-hf --prompts 128 \
        --batches 1 --runs 3 --new-tokens 128 --quantize $schemes \
        --out "$out/decode_$side.json" 2>&1 | grep "tok/s\|rror"
done
in_tree "$new" python3 perf/micro_gemv_quant.py --models Qwen3-8B Qwen3-1.7B --rows \
    --schemes int4 --sweep --out "$out/sweep.json" 2>"$out/sweep_stderr.txt" | cut -c1-240
date -u
