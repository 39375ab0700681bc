# One device call (carry .whl and .whl-bench): perf/micro_quant_libraries.py on Qwen3-8B and
# 1.7B shapes (LOG run 77). .whl-bench (ignored by git) holds GemLite and tqdm, the only
# packages GemLite needs that the device lacks, made here with
#   pip wheel --no-deps -w .whl-bench gemlite==0.6.0.post2
#   pip download --no-deps --only-binary=:all: -d .whl-bench tqdm
set -x
nvidia-smi --query-gpu=name --format=csv,noheader
. perf/device_wheels.sh && install_device_wheels || echo WHEELS-FAILED
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl-bench/*.whl
python3 -c "import numpy, triton, torch; print(numpy.__version__, triton.__version__, torch.__version__)"
PYTHONPATH=/tmp/site:/tmp/site2:$PWD timeout 540 python3 perf/micro_quant_libraries.py --models Qwen3-8B Qwen3-1.7B --rows 8 --gemlite --out $OUT/quant_libraries.json 2>&1 | grep -v '^  File\|^    ' | tail -60
