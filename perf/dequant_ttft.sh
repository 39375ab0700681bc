# One device call (carry .whl): Qwen3-8B time to first token and decode, bf16 / int8 / int4,
# on this tree and on a copy without the dequantize kernel (perf/patches/dequant_kernel.patch
# taken out), one after the other on one GPU. Results under $OUT.
set -u
. perf/device_wheels.sh && install_device_wheels || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
patched_copy /tmp/before perf/patches/dequant_kernel.patch unapply_patch || exit 1
grep -c launch_dequantize /tmp/before/fermi/models/quant_mm.py
bench() {
    in_tree "$1" timeout 250 python3 perf/bench_decode.py --models Qwen3-8B --skip-hf --prompts 128 \
        --batches 1 --runs 3 --new-tokens 128 --quantize $2 --out "$OUT/$3" 2>&1 | grep -E 'ours p128|\| Qwen3'
}
bench /tmp/before "int8 int4" h100_quant_8b_before_dequant.json
bench "$PWD" "none int8 int4" h100_quant_8b_after_dequant.json
