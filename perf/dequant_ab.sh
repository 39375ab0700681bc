# One device call (carry .whl): prefill's dequantize, torch's operations against the Triton
# kernel (perf/micro_dequant.py), then Qwen3-8B int8/int4 through bench_decode (TTFT) and
# the quantized GPU tests, all on the tree as sent. Results under $OUT (session 29 ran it on an
# H100: results/h100_dequant_ab.json, h100_quant_8b_dequant.json, h100_quant_cuda_dequant.log).
set -u
. perf/device_wheels.sh && install_device_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 perf/micro_dequant.py --models Qwen3-8B Qwen3-1.7B --out "$OUT/dequant_ab.json" | cut -c1-400
timeout 200 python3 perf/bench_decode.py --models Qwen3-8B --skip-hf --prompts 128 --batches 1 --runs 3 \
    --new-tokens 128 --quantize int8 int4 --out "$OUT/quant_8b_dequant.json" 2>&1 | tail -8
timeout 250 python3 -m pytest -p no:logging -p no:cacheprovider -o addopts="" -q -rfEs \
    tests/test_quant_cuda.py >"$OUT/quant_cuda_dequant.log" 2>&1
tail -3 "$OUT/quant_cuda_dequant.log"
