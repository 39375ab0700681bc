"""Core ML export: what Linux can check (trace numerics, package spec, MIL ops), and a
predict-with-state test that runs on macOS 15+."""

from __future__ import annotations

import re
import stat
import sys

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

import fermi  # noqa: E402
from export import coreml  # noqa: E402
from export.build import ExportOptions, export_model, load_any  # noqa: E402
from export.verify import compare, sample_prompt  # noqa: E402
from export.wrapper import CoreMLPositionStep, CoreMLStep  # noqa: E402
from fermi.loading import load_folder  # noqa: E402
from fermi.runners.artefact import read_manifest  # noqa: E402
from fermi.runners.coreml import coreml_unavailable_reason, split_query  # noqa: E402
from fermi.runners.torch_eager import TorchRunner  # noqa: E402
from tests.arch_templates import GEMMA2  # noqa: E402
from tests.test_arch_gemma2 import GEMMA2_BASE  # noqa: E402
from tests.test_loading import mapped  # noqa: E402
from tests.tiny import write_checkpoint, write_checkpoint_for  # noqa: E402
from tests.tiny_tokenizer import TINY_VOCAB_SIZE  # noqa: E402

SEQ, CHUNK = 64, 16
needs_coreml = pytest.mark.skipif(
    coreml_unavailable_reason() is not None, reason=str(coreml_unavailable_reason())
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("coreml") / "ckpt", seed=4)


def export_tiny(source, name, progress=lambda line: None, **options):
    """A Core ML export of the tiny checkpoint into ``source``'s folder ``name``: the
    folder and its manifest."""
    out = source.parent / name
    options = ExportOptions(
        model=str(source),
        target="coreml",
        out=out,
        max_seq_len=SEQ,
        prefill_chunk=CHUNK,
        **options,
    )
    return out, export_model(options, progress=progress)


@pytest.fixture(scope="module")
def exported(source):
    return export_tiny(source, "art")


def engine_runner(folder):
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    return TorchRunner(model, 1, SEQ, prefill_chunk=CHUNK)


def step_runner(folder, dtype, cache_dtype, traced=False):
    decoder = load_folder(folder, torch.device("cpu"), dtype).model
    step = CoreMLStep(decoder, SEQ, cache_dtype).eval()
    module = coreml.trace(step) if traced else step
    return coreml.StepRunner(module, decoder.cfg.vocab_size, SEQ, CHUNK)


def test_traced_module_with_fp32_cache_equals_the_engine(source):
    prompt = sample_prompt(453, 20, seed=1)  # longer than a chunk: two prefill calls
    parity = compare(
        engine_runner(source), step_runner(source, torch.float32, torch.float32, True), prompt, 32
    )
    assert parity.tokens_equal and parity.max_logit_diff < 1e-4, parity.summary()


def test_traced_module_with_fp16_cache_stays_within_fp16_error(source):
    prompt = sample_prompt(453, 12, seed=2)
    parity = compare(
        engine_runner(source), step_runner(source, torch.float32, torch.float16, True), prompt, 16
    )
    assert parity.max_logit_diff < 1e-2, parity.summary()


def test_fp16_weights_and_cache_stay_close_to_the_fp32_engine(source):
    prompt = sample_prompt(453, 12, seed=2)
    parity = compare(
        engine_runner(source), step_runner(source, torch.float16, torch.float16), prompt, 16
    )
    assert parity.max_logit_diff < 5e-2, parity.summary()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attn_logit_softcapping": None, "final_logit_softcapping": None}],
    ids=["softcaps", "fused_sdpa"],
)
def test_wrapper_is_generic_over_gemma2_windows_norms_and_scales(tmp_path, overrides):
    # Sliding windows of 8 (the prompt runs past them), sandwich norms, a query scale
    # that is not head_dim, with and without soft-capping.
    folder = write_checkpoint_for(
        tmp_path / "gemma2",
        {**GEMMA2_BASE, **overrides},
        seed=7,
        added_tokens=GEMMA2.added_tokens,
        tokenizer_config=GEMMA2.tokenizer_config,
        eos_tokens=GEMMA2.eos_tokens,
    )
    prompt = sample_prompt(GEMMA2_BASE["vocab_size"], 20, seed=3)
    parity = compare(
        engine_runner(folder), step_runner(folder, torch.float32, torch.float32), prompt, 16
    )
    assert parity.tokens_equal and parity.max_logit_diff < 1e-4, parity.summary()


def test_package_is_an_ios18_ml_program_with_the_manifest_io_and_fp16_states(exported):
    out, manifest = exported
    assert read_manifest(out) == manifest  # the package's inner files pass their checksums
    spec = coreml.load_spec(out / manifest.model_file)
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15
    assert spec.WhichOneof("Type") == "mlProgram"
    assert coreml.io_specs(out / manifest.model_file) == (
        manifest.inputs,
        manifest.outputs,
        manifest.states,
    )
    by_name = {t.name: t for t in manifest.inputs + manifest.outputs + manifest.states}
    assert by_name["input_ids"].shape == [1, f"1..{CHUNK}"]
    assert by_name["causal_mask"].shape == [1, 1, f"1..{CHUNK}", f"1..{SEQ}"]
    assert by_name["logits"].shape == [1, TINY_VOCAB_SIZE] and by_name["logits"].dtype == "float32"
    for name in ("k_cache", "v_cache"):
        assert by_name[name].shape == [2, 1, 2, SEQ, 16]
        assert by_name[name].dtype == "float16"
    assert manifest.cache.dtype == "float16" and manifest.dtype == "fp16"


def test_program_reads_and_writes_the_cache_state_and_uses_fused_attention(exported):
    out, manifest = exported
    ops = coreml.program_ops(coreml.load_spec(out / manifest.model_file))
    assert {"read_state", "slice_update", "write_state"} <= ops
    assert "scaled_dot_product_attention" in ops


def test_manifest_records_compute_units_one_slot_and_the_package_weights_check(exported):
    _, manifest = exported
    assert manifest.compute_units == "ALL"
    assert manifest.max_batch == 1  # every slot is a whole Core ML state
    numerics = manifest.numerics
    assert numerics is not None and "read back" in numerics.checked
    assert numerics.prompts == 6 and numerics.steps == 16
    assert numerics.max_logit_diff < 5e-2  # fp16 weights and cache


def position_runner(folder, cache_dtype, traced=False):
    decoder = load_folder(folder, torch.device("cpu"), torch.float32).model
    step = CoreMLPositionStep(decoder, SEQ, cache_dtype).eval()
    module = coreml.trace(step) if traced else step
    sizes = coreml.query_sizes(CHUNK)
    return coreml.StepRunner(module, decoder.cfg.vocab_size, SEQ, CHUNK, sizes)


def test_query_sizes_cover_every_chunk_length_largest_first():
    assert coreml.query_sizes(16) == [1, 2, 4, 8, 16]
    assert coreml.query_sizes(12) == [1, 2, 4, 8, 12]
    assert coreml.query_sizes(1) == [1]
    sizes = coreml.query_sizes(16)
    for n in range(1, 17):
        parts = split_query(n, sizes)
        assert sum(parts) == n and parts == sorted(parts, reverse=True)
        assert len(parts) <= 5
    assert split_query(100, coreml.query_sizes(64)) == [64, 32, 4]
    with pytest.raises(ValueError, match="include 1"):
        split_query(3, [2])


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_neural_engine_step_with_fp32_cache_equals_the_engine(source, traced):
    """The fixed-shape step (position input, the whole cache read under a mask built
    inside) computes what the engine computes; a 23-token prompt goes in as a chunk of 16,
    then 7 = 4 + 2 + 1 in three calls."""
    prompt = sample_prompt(453, 23, seed=1)
    parity = compare(
        engine_runner(source), position_runner(source, torch.float32, traced), prompt, 32
    )
    assert parity.tokens_equal and parity.max_logit_diff < 1e-4, parity.summary()


@pytest.fixture(scope="module")
def neural_engine(source):
    return export_tiny(source, "art-ne", compute_units="CPU_AND_NE")


def test_neural_engine_package_has_enumerated_query_sizes_and_a_position_input(neural_engine):
    out, manifest = neural_engine
    assert read_manifest(out) == manifest
    spec = coreml.load_spec(out / manifest.model_file)
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert set(inputs) == {"input_ids", "position"}  # no mask: no range-flexible input
    shapes = [list(s.shape) for s in inputs["input_ids"].enumeratedShapes.shapes]
    assert shapes == [[1, n] for n in (1, 2, 4, 8, 16)]
    assert not inputs["input_ids"].shapeRange.sizeRanges
    assert list(inputs["position"].shape) == [1]
    assert manifest.compute_units == "CPU_AND_NE" and manifest.query_sizes == [1, 2, 4, 8, 16]
    by_name = {t.name: t for t in manifest.inputs}
    assert by_name["input_ids"].shape == [1, "1|2|4|8|16"]
    assert by_name["position"].shape == [1] and by_name["position"].dtype == "int32"
    ops = coreml.program_ops(spec)
    assert {"read_state", "slice_update", "write_state", "scaled_dot_product_attention"} <= ops
    # The export's check ran the package's weights through the enumerated step.
    numerics = manifest.numerics
    assert numerics is not None and numerics.max_logit_diff < 5e-2
    assert all(n == numerics.steps for n in numerics.greedy_equal)


def test_coreml_runner_feeds_a_neural_engine_package_by_position(source):
    """CoreMLRunner's own feeding (it runs on macOS only), driven here by the traced
    fixed-shape step standing in for the package's predict: a 7-token chunk goes in as
    4 + 2 + 1 at positions 16, 20, 22, and every call's logits equal the engine's."""
    from fermi.runners.coreml import CoreMLRunner

    decoder = load_folder(source, torch.device("cpu"), torch.float32).model
    traced = coreml.trace(CoreMLPositionStep(decoder, SEQ, torch.float32).eval())
    calls = []

    class Package:  # MLModel.predict over the traced step, with the call's inputs recorded
        def predict(self, inputs, state):
            ids, position = inputs["input_ids"], inputs["position"]
            assert ids.dtype == np.int32 and position.dtype == np.int32 and position.shape == (1,)
            calls.append((ids.shape[1], int(position[0])))
            with torch.no_grad():
                logits = traced(torch.from_numpy(ids), torch.from_numpy(position))
            return {"logits": logits.numpy()}

    runner = object.__new__(CoreMLRunner)  # (its constructor loads a package: macOS only)
    runner.model, runner.states, runner.sizes = Package(), [None], coreml.query_sizes(CHUNK)
    engine = engine_runner(source)
    prompt = sample_prompt(453, 23, seed=5)
    with torch.no_grad():
        for start, end in ((0, 16), (16, 23)):
            want = engine.prefill(0, prompt[start:end], start)
            got = runner.prefill(0, prompt[start:end], start)
            assert (got - want).abs().max() < 1e-4
        want = engine.decode([0], [7], [23])
        got = runner.decode([0], [7], [23])
    assert (got - want).abs().max() < 1e-4
    assert calls == [(16, 0), (4, 16), (2, 20), (1, 22), (1, 23)]


def test_a_manifests_query_sizes_are_checked():
    from fermi.runners.coreml import check_query_sizes

    check_query_sizes([1, 2, 4, 8, 16], 16)
    for bad in ([], [2, 4], [0, 1], [-1, 1]):
        with pytest.raises(ValueError, match="include 1"):
            check_query_sizes(bad)
    with pytest.raises(ValueError, match="past the prefill chunk"):
        check_query_sizes([1, 32], 16)


@pytest.fixture(scope="module")
def quantized(source):
    """int8 and int4 exports with their progress lines."""
    found = {}
    for kind in ("int8", "int4"):
        lines: list[str] = []
        _, manifest = export_tiny(source, kind, lines.append, quantize=kind)
        found[kind] = (manifest, lines)
    return found


def test_the_check_runs_the_packages_dequantized_weights_not_the_sources(quantized, source):
    """The weights the check loads are the package's: int8 per channel, each one within
    half a step (plus fp16 rounding) of the source's, and not equal to it."""
    manifest, _ = quantized["int8"]
    package = source.parent / "int8" / manifest.model_file
    read = coreml.package_constants(package)
    shipped = read["decoder_model_layers_0_self_attn_qkv_proj_weight_quantized"]
    original = load_folder(source, torch.device("cpu"), torch.float32).model
    weight = original.model.layers[0].self_attn.qkv_proj.weight.numpy()
    step = np.abs(weight).max(axis=1, keepdims=True) / 127
    error = np.abs(shipped.astype(np.float32) - weight)
    assert (error <= step / 2 + np.abs(weight) * 2**-10 + 1e-6).all()
    assert error.max() > 1e-4
    runner = coreml.package_runner(package, load_folder(source, torch.device("cpu"), torch.float32))
    loaded = runner.step.decoder.model.layers[0].self_attn.qkv_proj.weight
    assert np.array_equal(loaded.numpy(), shipped.astype(np.float32))


@pytest.fixture(scope="module")
def fp32_package(source):
    out, manifest = export_tiny(source, "fp32", dtype="fp32", verify=False)
    return out / manifest.model_file


def coremltools_constants(package):
    """Every constant as coremltools' own program reader materializes it (the reference:
    the path ``each_constant`` takes for packages it does not read itself)."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    return dict(coreml._program_constants(model.get_spec(), model.weights_dir))


@pytest.mark.parametrize("which", ["fp16", "fp32", "int8", "int4"])
def test_constants_are_read_one_blob_at_a_time_as_coremltools_reads_them(
    exported, fp32_package, quantized, source, which
):
    """``each_constant`` reads a package's weight file blob by blob (the check then holds
    one at a time) and dequantizes int8 / int4 weights itself; every floating-point
    constant and every dequantized weight equals coremltools' reading, in name, dtype,
    shape and value."""
    packages = {"fp16": exported[0] / exported[1].model_file, "fp32": fp32_package}
    packages |= {k: source.parent / k / quantized[k][0].model_file for k in ("int8", "int4")}
    package = packages[which]
    ours = dict(coreml.each_constant(package))
    reference = {
        name: value
        for name, value in coremltools_constants(package).items()
        if value.dtype in (np.float16, np.float32) and value.ndim
    }
    # coremltools' reader names a quantized weight's scales (and offsets) as constants of
    # their own; they are not weights, and ours leaves them inside the dequantization.
    inputs = {n for n in reference if re.fullmatch(r".+_quantized_(scale|offset)_\d+", n)}
    assert ours.keys() == reference.keys() - inputs
    assert bool(inputs) == (which in ("int8", "int4"))
    for name in ours:
        value = reference[name]
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert np.array_equal(ours[name], value), name
    matrices = {name: v for name, v in ours.items() if v.ndim == 2}
    assert {v.dtype for v in matrices.values()} == {
        np.dtype(np.float32 if which == "fp32" else np.float16)
    }
    dequantized = [name for name in matrices if name.endswith("_quantized")]
    assert len(dequantized) == (0 if which in ("fp16", "fp32") else 9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_export_loads_a_source_that_owns_its_memory(source):
    """The export's source (and the check's, whose tensors take the package's weights) maps
    no file: a tensor mapping its checkpoint privately would count the file's pages against
    the export for as long as it lives, and copy each page it is written (perf/LOG.md run 49)."""
    checkpoint = load_any(str(source), torch.float32)
    assert not mapped((source / "model.safetensors").resolve())
    assert checkpoint.model.model.layers[0].self_attn.qkv_proj.weight.shape[1] > 0


def test_quantized_exports_report_their_measured_agreement(exported, quantized):
    fp16 = exported[1].numerics
    int8, int4 = (quantized[k][0].numerics for k in ("int8", "int4"))
    assert fp16.mean_logit_diff < int8.mean_logit_diff < int4.mean_logit_diff
    for kind in ("int8", "int4"):
        manifest, lines = quantized[kind]
        assert manifest.quantize == kind
        checked = "Core ML package weights vs the source"
        assert any(line.strip().startswith(checked) for line in lines)
    # The tiny random model's near-tied logits make int4 pick another token on about a
    # quarter of the steps (seen: 77%): reported loudly.
    assert int4.top1_agreement < 0.9
    warning = "WARNING: the int4 export follows its source"
    assert any(warning in line for line in quantized["int4"][1])


def test_int4_quantizes_projections_and_embedding_per_block_but_not_rope_tables(exported, tmp_path):
    out, manifest = exported
    model = ct.models.MLModel(str(out / manifest.model_file), skip_model_load=True)
    path = tmp_path / "int4.mlpackage"
    coreml.quantize(model, "int4").save(str(path))
    spec = coreml.load_spec(path)
    ops = coreml.program_ops(spec)
    assert {"constexpr_blockwise_shift_scale", "read_state", "write_state"} <= ops
    quantized = [
        op.outputs[0].name
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
        if op.type == "constexpr_blockwise_shift_scale"
    ]
    assert any("embed_tokens" in name for name in quantized)
    assert sum("qkv_proj" in name for name in quantized) == 2  # one fused q/k/v a layer
    assert not any("rope" in name for name in quantized)


@needs_coreml
def test_predict_with_state_generates_what_the_engine_generates(exported, source):
    out, _ = exported
    engine = fermi.load(out)
    reference = fermi.load(source, max_seq_len=SEQ, runner="torch-cpu")
    try:
        assert engine.capabilities.name == "coreml"
        a = engine.generate(prompt="the quick brown fox", max_tokens=16, temperature=0.0)
        b = reference.generate(prompt="the quick brown fox", max_tokens=16, temperature=0.0)
        assert a.token_ids == b.token_ids
    finally:
        engine.close()
        reference.close()


@needs_coreml
def test_predict_with_separate_states_keeps_slots_apart(exported, source):
    from fermi.runners.artefact import load_artefact

    out, manifest = exported
    runner = load_artefact(out, max_batch=2).runner
    prompt = sample_prompt(manifest.vocab_size, 12, seed=9)
    alone = runner.prefill(0, prompt, 0)
    runner.prefill(1, sample_prompt(manifest.vocab_size, 7, seed=1), 0)
    again = runner.prefill(0, prompt, 0)
    assert (alone - again).abs().max() < 1e-3
    parity = compare(engine_runner(source), runner, prompt, 16)
    assert parity.max_logit_diff < 5e-2, parity.summary()


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_gguf_sources_q4_1_blocks_are_kept_not_quantized_again(source, tmp_path, dtype):
    """int4 from a Q4_1 file: the package stores the file's own blocks (codes, scales,
    offsets), so it computes the source's weights up to the rounding of the package's
    type, where quantizing the dequantized weights again would move them by up to half a
    step. With ``--dtype fp32`` the blocks dequantize to float32 weights."""
    from gguf import GGMLQuantizationType

    from fermi.gguf import load_gguf
    from tests.gguf_files import write_gguf

    gguf = write_gguf(source, tmp_path / "q4_1.gguf", "qwen3", GGMLQuantizationType.Q4_1)
    lines: list[str] = []
    options = ExportOptions(
        model=str(gguf),
        target="coreml",
        out=tmp_path / "art",
        max_seq_len=SEQ,
        prefill_chunk=CHUNK,
        quantize="int4",
        dtype=dtype,
    )
    manifest = export_model(options, progress=lines.append)
    assert any("9 weights keep the GGUF file's Q4_0/Q4_1/Q8_0 blocks" in line for line in lines)

    read = coreml.package_constants(tmp_path / "art" / manifest.model_file)
    name = "decoder_model_layers_1_mlp_gate_up_proj_weight"
    shipped = read[name + "_gguf_blocks"]
    assert shipped.dtype == (np.float16 if dtype == "fp16" else np.float32)
    weight = load_gguf(gguf, torch.device("cpu"), "fp32").model.model.layers[1].mlp
    weight = weight.gate_up_proj.weight.numpy()
    assert np.abs(shipped.astype(np.float32) - weight).max() <= np.abs(weight).max() * 2**-9
    # Seen: every greedy token equal on all six prompts (top-1 100%), where the same
    # weights quantized again to int4 agreed on 75% of the steps.
    assert manifest.numerics.top1_agreement > 0.97


def test_the_cli_shows_one_bar_and_none_of_the_converters_output(source, tmp_path):
    """coremltools prints a progress bar per conversion pass and torch.onnx its steps: the
    export holds them back and shows its own single bar over the stages."""
    from click.testing import CliRunner

    from fermi.cli import main

    args = ["export", "--model", str(source), "--target", "coreml", "--quantize", "int8"]
    args += ["--out", str(tmp_path / "art"), "--max-seq-len", str(SEQ), "--no-verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    everything = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Running MIL" not in everything and "Converting PyTorch" not in everything
    assert "compression pass" not in everything
    assert "4/4" in everything  # the bar's last state: load, convert, quantize, write
    assert "exported Qwen3ForCausalLM to" in result.stdout


def test_an_fp16_package_normalises_in_the_overflow_safe_form(exported):
    """The export casts the decoder to fp16 before tracing (the converter then holds each
    weight once, in fp16). In fp16 the decoder spells its RMS norm out, which Core ML would
    compute as a square of fp16 activations; the trace goes through ``rms_norm`` instead,
    which the converter turns into a form that divides by the largest magnitude first.
    Every norm of the tiny model (2 layers x 4, and the final one) has that form."""
    out, manifest = exported
    spec = coreml.load_spec(out / manifest.model_file)
    kinds = [
        op.type
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
    ]
    assert kinds.count("reduce_max") == 9 and kinds.count("sqrt") == 9
    assert "pow" not in kinds and "rsqrt" not in kinds


def test_everything_in_the_folder_is_as_readable_as_the_folder(exported):
    """coremltools copies the package from a 0700 mkdtemp folder, and the copy keeps that
    mode: the export gives every folder inside the artefact folder's own mode (the umask's)
    and every file the same without execute bits, so another user can read it all."""
    out, _ = exported
    mode = stat.S_IMODE(out.stat().st_mode)
    for path in out.rglob("*"):
        want = mode if path.is_dir() else mode & 0o666
        assert stat.S_IMODE(path.stat().st_mode) == want, path
