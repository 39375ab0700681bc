#!/usr/bin/env bash
# The measurements behind perf/README.md's lead table (issue 17), one part a device call:
#   bash perf/lead_table.sh small   Qwen3-0.6B and 1.7B: ours, transformers eager and static +
#                                   compile, batches 1/8/32/128; then a fresh process's start
#                                   (Qwen3-1.7B, warm-up "first", cold and warm)  (~400 s)
#   bash perf/lead_table.sh large   Qwen3-4B and 8B, the same rows              (~450 s)
#   bash perf/lead_table.sh error   bf16 against float32 logits, ours and transformers, the
#                                   four models at prompts 128 and 2048         (~300 s)
# Writes $OUT/lead_<part>.json (and lead_start.json); carry .whl. The table:
#   python3 perf/lead_table.py perf/results/<card>_lead_*.json
set -u
# shellcheck source=perf/device_wheels.sh
. "$(dirname "${BASH_SOURCE[0]}")/device_wheels.sh"
install_device_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
out=${OUT:-/tmp}
bench() {
    python3 perf/bench_decode.py --models "$@" --prompts 128 2048 --hf-prompts 128 \
        --batches 1 8 32 128 --max-seq-len 2304 --hf-eager-tokens 32 --runs 3 --new-tokens 128
}
case ${1:-} in
small)
    bench Qwen3-0.6B Qwen3-1.7B --out "$out/lead_small.json" >"$out/lead_small.log" 2>&1
    tail -30 "$out/lead_small.log"
    python3 perf/start_phases.py --model Qwen3-1.7B --warmup first --variants plain \
        --out "$out/lead_start.json" >"$out/lead_start.log" 2>&1
    tail -5 "$out/lead_start.log"
    ;;
large)
    bench Qwen3-4B Qwen3-8B --out "$out/lead_large.json" >"$out/lead_large.log" 2>&1
    tail -30 "$out/lead_large.log"
    ;;
error)
    python3 perf/bf16_error.py --models Qwen3-0.6B Qwen3-1.7B Qwen3-4B Qwen3-8B \
        --prompts 128 2048 --out "$out/lead_error.json" >"$out/lead_error.log" 2>&1
    tail -30 "$out/lead_error.log"
    ;;
*)
    echo "usage: $0 small|large|error" >&2
    exit 2
    ;;
esac
