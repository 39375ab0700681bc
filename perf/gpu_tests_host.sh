# The GPU test groups a change on the host side of the engine touches (request building,
# runner selection, sampling checks, grammar messages), side by side in one call:
# engine, reuse, runner and the grammar tests (perf/gpu_tests.sh's groups, quant's
# grammar half). FERMI_REV=<commit> bash perf/gpu_tests_host.sh   (carry .whl; ~200 s)
self=$(dirname "${BASH_SOURCE[0]}")/gpu_tests.sh
bash "$self" engine "tests/test_sampling.py tests/test_scheduler_overlap.py tests/test_core_review.py tests/test_row_kernels.py" &
a=$!
bash "$self" reuse "tests/test_prefix_reuse.py tests/test_slot_compaction.py tests/test_logit_bias.py" &
b=$!
bash "$self" grammar tests/test_grammar_cuda.py &
c=$!
bash "$self" runner "tests/test_torch_cuda_runner.py tests/test_cuda.py"
status=$?
for job in $a $b $c; do wait "$job" || status=1; done
exit $status
