"""Weight-only int8/int4 quantization (fermi.models.quant) on CPU: the stored form, the
layers against a float reference on fresh random inputs, the loader, GGUF's 4-bit blocks
kept as they are, the engine and the CLI flag."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFWriter

import fermi
from fermi import native
from fermi.gguf import load_gguf
from fermi.gguf_reader import GGUFFile
from fermi.loading import load_folder
from fermi.models import gemv as G
from fermi.models import quant as Q
from tests.gguf_files import write_gguf
from tests.serving import NEEDS_SMOLLM2
from tests.test_gguf import Q as GT
from tests.test_gguf import random_blocks
from tests.tiny import write_checkpoint

CPU = torch.device("cpu")
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "qwen3", {}, seed=6)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def test_int4_packing_round_trips_in_llama_cpp_nibble_order():
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    codes = Q.pack_int4(q, 32)
    assert codes.shape == (3, 32) and codes.dtype == torch.uint8
    # Byte j of a group: value j low, value j + 16 high.
    assert int(codes[1, 5]) == int(q[1, 5]) | (int(q[1, 21]) << 4)
    assert int(codes[2, 16 + 3]) == int(q[2, 32 + 3]) | (int(q[2, 32 + 19]) << 4)
    assert torch.equal(Q.unpack_int4(codes, 32), q.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_of_its_group(group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(group)) * 0.05
    q = Q.quantize_int4(w, group)
    assert q.shape == (48, 256) and q.group_size == group and q.scheme == "int4"
    err = (q.dequantize() - w).abs().view(48, 256 // group, group)
    step = q.scales[..., None]
    # Half a step, plus the fp16 rounding of the minimum (codes are chosen after it).
    assert bool((err <= step / 2 + 1e-3 * w.abs().max()).all())


def test_int8_error_is_at_most_half_a_step_of_its_row():
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    q = Q.quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.scales.shape == (40,)
    assert int(q.codes.abs().max()) == 127
    assert bool(((q.dequantize() - w).abs() <= q.scales[:, None] / 2 + 1e-6).all())


def test_a_row_of_zeros_quantizes_to_zeros():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    for scheme in Q.SCHEMES:
        q = Q.quantize(w, scheme)
        assert torch.equal(q.dequantize()[0], torch.zeros(64))
        assert torch.isfinite(q.dequantize()).all()


# Both CPU layouts: fermi's kernels where they build ("native"), torch's packed kernels.
LAYOUTS = [
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no kernels")),
    "torch",
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", Q.SCHEMES)
@pytest.mark.parametrize("rows", [1, 4, 37])
def test_quantized_linear_on_cpu_matches_a_float_reference_on_fresh_inputs(scheme, rows, layout):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=g) * 0.05
    bias = torch.randn(96, generator=g)
    q = Q.quantize(w, scheme)
    layer = Q.QuantLinear(q, bias, CPU, torch.float32, layout)
    assert layer.layout == layout
    x = torch.randn(rows, 3, 128, generator=g)  # any leading shape
    y = layer(x)
    assert y.shape == (rows, 3, 96) and y.dtype == torch.float32
    # Against the float product with the weights the layer holds: torch's bf16 activations
    # cost about 2^-8 relative; fermi's kernels round each block of inputs to int16 steps
    # (at most 1/65534 of a block's largest value per input), and are then exact.
    assert rel(y, F.linear(x, layer.dequantized(), bias)) < (1e-2 if layout == "torch" else 1e-4)
    if layout == "native":
        w_stored = layer.weight_as_stored()
        full = w_stored.dequantize()
        if scheme == "int4":
            block = w_stored.group_size
            mins = w_stored.mins.repeat_interleave(block, dim=1)
        else:
            block, mins = Q.INT8_BLOCK, torch.zeros_like(full)
        codes_part = F.linear(Q.rounded_inputs(x, block), full - mins)
        assert rel(y, codes_part + F.linear(x, mins, bias)) < 1e-6
    # Against the original float weights: also the quantization error.
    assert rel(y, F.linear(x, w, bias)) < (3e-2 if scheme == "int8" else 1.5e-1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_cpu_layouts_hold_the_stored_codes_with_their_scales_precision(scheme, layout):
    """torch's: bf16 scales (and zeros); fermi's kernels: int8 scales as they are, int4
    scales and minimums in fp16 (what device_precision says of each)."""
    n = 50 if layout == "native" else 64  # (a part-filled panel; torch's packing wants 16s)
    w = torch.randn(n, 96, generator=torch.Generator().manual_seed(2))
    q = Q.quantize(w, scheme)
    q = Q.QuantizedWeight(q.codes, q.scales * 1.0001, q.mins)  # scales that fp16 rounds
    stored = Q.QuantLinear(q, None, CPU, torch.float32, layout).weight_as_stored()
    assert torch.equal(stored.codes, q.codes)
    expected = Q.device_precision(q, CPU, layout)
    assert torch.allclose(stored.dequantize(), expected.dequantize(), rtol=0, atol=1e-6)
    exact = layout == "native" and scheme == "int8"
    assert torch.equal(stored.scales, q.scales) == exact


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_fused_row_reference_equals_the_unfused_ops(scheme, layout):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g) * 0.1
    layer = Q.QuantLinear(Q.quantize(w, scheme), None, CPU, torch.float32, layout)
    norm_w, res = torch.rand(64, generator=g) + 0.5, torch.randn(1, 32, generator=g)
    x, x2 = torch.randn(1, 64, generator=g), torch.randn(1, 128, generator=g)
    got = layer.row(x, norm_weight=norm_w, eps=1e-5, residual=res)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    assert torch.allclose(got, res + layer(h), atol=1e-6)
    got = layer.row(x2, act=G.ACT_SILU_MUL)
    gate, up = x2.chunk(2, dim=-1)
    assert torch.allclose(got, layer(F.silu(gate) * up), atol=1e-6)
    with pytest.raises(ValueError, match="one row"):
        layer.row(torch.randn(2, 64))


def test_bad_scheme_and_group_are_refused_with_the_choices():
    with pytest.raises(
        ValueError, match=r"quantize='int3' is not supported; choose one of int8, int4"
    ):
        Q.check_scheme("int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        Q.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="K divisible by 64"):
        Q.quantize_int4(torch.randn(4, 96), 64)


def decode_logits(model, steps: int = 5) -> torch.Tensor:
    model.setup_cache(max_batch=1, max_seq_len=64)
    prompt = torch.randint(
        0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4)
    )
    # Fixed next tokens: two models whose logits differ by rounding noise (int4's inputs
    # can land on neighbouring int8 steps) take the same path, where greedy ones part at
    # the first near-tie.
    tokens = torch.randint(
        0, model.cfg.vocab_size, (steps, 1, 1), generator=torch.Generator().manual_seed(5)
    )
    out = []
    with torch.inference_mode():
        logits = model(prompt, torch.arange(7)[None], torch.tensor([0]), kv_len=7)
        for step in range(steps):
            out.append(logits)
            pos = torch.tensor([[7 + step]])
            logits = model(tokens[step], pos, torch.tensor([0]), kv_len=8 + step)
    return torch.cat(out)


def prompt_logits(model) -> torch.Tensor:
    """Logits at every position of a 12-token prompt (no greedy path to diverge)."""
    model.setup_cache(max_batch=1, max_seq_len=64)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=g)
    with torch.inference_mode():
        return model(prompt, torch.arange(12)[None], torch.tensor([0]), 12, last_only=False)


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_loaded_quantized_model_is_close_to_the_float_one_and_reports_its_error(folder, scheme):
    plain = load_folder(folder, CPU, torch.float32).model
    model = load_folder(folder, CPU, torch.float32, Q.QuantSpec(scheme)).model
    layers = plain.cfg.num_hidden_layers
    quantized = [m for m in model.modules() if isinstance(m, Q.QuantLinear)]
    assert len(quantized) == 4 * layers + 1  # the four projections of each layer, lm_head
    assert model.lm_head.scheme == "int8" and model.model.layers[0].mlp.down_proj.scheme == scheme
    # The embedding table is stored in fp16 on CPU (rows gathered in float32).
    assert model.model.embed_tokens.weight.dtype == torch.float16
    report = model.quantization
    assert report is not None and not report.kept and len(report.errors) == 4 * layers + 1
    assert 0 < max(report.errors.values()) < (0.01 if scheme == "int8" else 0.15)
    want, got = prompt_logits(plain), prompt_logits(model)
    assert rel(got, want) < (0.05 if scheme == "int8" else 0.3)


@pytest.mark.parametrize(
    ("capability", "machine", "layout", "warned"),
    [
        ("AVX2", "x86_64", "torch", True),
        ("AVX2", "x86_64", "native", False),
        ("AVX512", "x86_64", "torch", False),
        ("DEFAULT", "aarch64", "torch", False),
    ],
)
def test_a_quantized_cpu_load_says_when_its_kernels_save_no_time_here(
    folder, monkeypatch, caplog, capability, machine, layout, warned
):
    """On an x86 CPU without AVX-512 torch's int8/int4 products are no faster than fp16
    storage (perf/LOG.md run 55): a quantized load on them says so; a float load, a CPU
    where they were faster (or were not measured), or one where fermi's own kernels run
    the quantized products, says nothing."""
    monkeypatch.setattr(fermi.loading, "cpu_layout", lambda: layout)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    with caplog.at_level(logging.WARNING, logger="fermi.loading"):
        load_folder(folder, CPU, torch.float32)
        assert not [r for r in caplog.records if "AVX-512" in r.getMessage()]
        load_folder(folder, CPU, torch.float32, Q.QuantSpec("int8"))
    said = [r.getMessage() for r in caplog.records if "AVX-512" in r.getMessage()]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert said[0].startswith(f"this CPU's best kernels are {capability} (no AVX-512)")
        assert "saves memory here, not time" in said[0]


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_row_products_of_a_quantized_model_give_its_unfused_logits(folder, scheme):
    model = load_folder(folder, CPU, torch.float32, Q.QuantSpec(scheme)).model
    rows = copy.deepcopy(model)
    assert rows.use_row_kernels()
    plain = decode_logits(model)
    # fermi's kernels round each block of inputs to int16 steps; the fused norm's float32
    # noise can put an input on the neighbouring step (measured: 4e-4 of the mean |logit|)
    tol = 1e-4 if Q.cpu_layout() == "torch" else 2e-3 * plain.abs().mean().item()
    assert (decode_logits(rows) - plain).abs().max().item() < tol


def test_engine_generates_with_quantize_and_refuses_a_bad_value_before_loading(folder):
    with fermi.load(folder, quantize="int4", max_batch=2, max_seq_len=64) as engine:
        out = engine.generate(prompt="hello", max_tokens=5, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 5
        assert engine.runner.model.quantization.spec == Q.QuantSpec("int4")
        # (a CPU model whose layers read 4 bits keeps its KV cache in fp16)
        assert engine.runner.model.model.layers[0].self_attn.cache.k.dtype == torch.float16
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        fermi.load(folder / "no-such-folder", quantize="int3")


def test_cli_quantize_flag_is_passed_on_and_bad_values_are_refused(folder):
    env = {**os.environ, "NO_COLOR": "1"}
    base = [sys.executable, "-m", "fermi.cli", "generate", "--model", str(folder), "hi"]
    args = ["--max-tokens", "3", "--temperature", "0", "--raw"]
    bad = subprocess.run([*base, "--quantize", "int3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "'int3' is not one of 'int8', 'int4'" in bad.stderr
    from click.testing import CliRunner

    from fermi import cli

    seen = []
    real = fermi.load

    def load(*a, **kw):
        seen.append(kw.get("quantize"))
        return real(*a, **kw)

    pytest.MonkeyPatch().setattr(fermi, "load", load)
    try:
        res = CliRunner().invoke(cli.main, [*base[3:], *args, "--quantize", "int8"])
    finally:
        pytest.MonkeyPatch().undo()
    assert res.exit_code == 0, res.output
    assert seen == ["int8"]


# -- GGUF --------------------------------------------------------------------------------


def one_tensor_gguf(path: Path, raw: np.ndarray, qtype) -> GGUFFile:
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q4_1, GT.Q4_K])
def test_gguf_4bit_codes_kept_equal_the_dequantized_tensor(tmp_path, qtype):
    gguf = one_tensor_gguf(tmp_path / "q.gguf", random_blocks(qtype, 6, 512), qtype)
    kept = gguf.int4_codes("w")
    assert kept is not None and kept.shape == (6, 512) and kept.group_size == 32
    assert torch.allclose(kept.dequantize(), gguf.tensor("w", torch.float32), rtol=0, atol=1e-6)


def test_kept_codes_whose_scales_the_kernels_round_report_what_that_costs():
    """Q4_0/Q4_1 scales are fp16 values, held exactly; Q4_K's (d times a 6-bit sub-scale)
    need more bits than fp16 has: a load that keeps such codes says what the rounding of
    its scales to the kernels' precision adds, instead of claiming the file's weights."""
    g = torch.Generator().manual_seed(4)
    exact = Q.quantize_int4(torch.randn(48, 64, generator=g))  # fp16 scales and minimums
    d = torch.rand(48, 2, generator=g).half().float()
    sub = torch.randint(1, 64, (48, 2), generator=g).float()
    finer = Q.QuantizedWeight(exact.codes, d * sub / 37.0, exact.mins)  # as Q4_K's d * sc
    spec = Q.QuantSpec("int4")
    _, error, rounding = Q.build_linear([exact], "int4", spec, None, CPU, torch.float32)
    assert error is None and rounding == 0.0
    layer, error, rounding = Q.build_linear([finer], "int4", spec, None, CPU, torch.float32)
    held = layer.dequantized()
    assert error is None and 0 < rounding < 1e-3
    want = finer.dequantize()
    frobenius = torch.linalg.vector_norm(held - want) / torch.linalg.vector_norm(want)
    assert rounding == pytest.approx(float(frobenius), rel=1e-3)
    report = Q.QuantReport(spec, ["a", "b"], {}, 0, {"b": rounding})
    assert "2 kept their stored codes; 1 of them with scales rounded" in report.summary()


@pytest.mark.parametrize("qtype", [GT.Q8_0, GT.Q6_K])
def test_gguf_blocks_that_do_not_map_to_int4_are_not_kept(tmp_path, qtype):
    gguf = one_tensor_gguf(tmp_path / "q.gguf", random_blocks(qtype, 2, 256), qtype)
    assert gguf.int4_codes("w") is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q4_1])
def test_gguf_kept_int4_model_equals_its_dequantized_weights(tmp_path, arch, qtype):
    """Loading a Q4 file with quantize="int4" keeps every layer's codes (llama's q/k rows
    unpermuted with them): its layers hold exactly the file's dequantized weights."""
    overrides = LLAMA if arch == "llama" else {}
    hf = write_checkpoint(tmp_path / "hf", overrides, seed=7)
    path = write_gguf(hf, tmp_path / "m.gguf", arch, qtype)
    float_model = load_gguf(path, CPU, "fp32").model
    kept = load_gguf(path, CPU, "fp32", Q.QuantSpec("int4")).model
    report = kept.quantization
    layers = float_model.cfg.num_hidden_layers
    assert len(report.kept) == 4 * layers and list(report.errors) == ["lm_head"]
    assert not report.rounded  # (fp16 scales, held exactly)
    gguf = GGUFFile(path)
    for i in range(layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
            want = float_model.get_submodule(f"model.layers.{i}.{name}").weight
            got = kept.get_submodule(f"model.layers.{i}.{name}")
            # The CPU kernel's scales are bf16: only their rounding separates the two.
            assert rel(got.dequantized(), want) < 1e-2
        for ours, theirs in (("self_attn.o_proj", "attn_output"), ("mlp.down_proj", "ffn_down")):
            stored = kept.get_submodule(f"model.layers.{i}.{ours}").weight_as_stored()
            assert torch.equal(stored.codes, gguf.int4_codes(f"blk.{i}.{theirs}.weight").codes)
    assert rel(prompt_logits(kept), prompt_logits(float_model)) < 0.1


@pytest.mark.parametrize("n", [1, 3, 10])
def test_blocks_of_rows_quantize_as_the_whole_matrix_at_once(monkeypatch, n):
    """Quantizing (and measuring the error) a block of rows at a time gives the values the
    whole matrix gives, for a row count that is and is not a multiple of the block."""
    w = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) * 3
    w[0, :32] = 0.5  # a constant group: its scale is 1 (no division by zero)
    # The formulas on the whole matrix, as they read before blocks.
    s8 = w.abs().amax(dim=1) / 127.0
    s8 = torch.where(s8 > 0, s8, torch.ones_like(s8))
    c8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
    g = w.view(n, 2, 32)
    low, high = g.amin(dim=2), g.amax(dim=2)
    s4 = ((high - low) / 15.0).half().float()
    s4 = torch.where(s4 > 0, s4, torch.ones_like(s4))
    m4 = low.half().float()
    q4 = torch.round((g - m4[..., None]) / s4[..., None]).clamp(0, 15).view(n, 64)
    monkeypatch.setattr(Q, "BLOCK_ROWS", 3)
    q8, q4w = Q.quantize_int8(w), Q.quantize_int4(w, 32)
    assert torch.equal(q8.codes, c8) and torch.equal(q8.scales, s8)
    assert torch.equal(q4w.codes, Q.pack_int4(q4, 32))
    assert torch.equal(q4w.scales, s4) and torch.equal(q4w.mins, m4)
    for q in (q8, q4w):
        whole = float((q.dequantize() - w).norm() / w.norm())
        assert Q.relative_error(q, w) == pytest.approx(whole, rel=1e-5)


def test_a_kept_int4_load_lets_each_layers_codes_go_once_the_layer_is_built(tmp_path, monkeypatch):
    """The file's 4-bit codes are held by the load only until their layer is built (its
    kernel's packed form replaces them), not to the end of the load: each build finds the
    codes of every layer built before it gone."""
    import weakref

    import fermi.loading as loading

    hf = write_checkpoint(tmp_path / "hf", {}, seed=7)
    path = write_gguf(hf, tmp_path / "m.gguf", "qwen3", GT.Q4_0)
    earlier: list[weakref.ref] = []
    built = []
    real = loading.build_linear

    def spy(parts, *args):
        alive = [ref for ref in earlier if ref() is not None]
        assert not alive, f"{len(alive)} parts of layers already built are still held"
        out = real(parts, *args)
        earlier.extend(weakref.ref(p.codes) for p in parts if isinstance(p, Q.QuantizedWeight))
        built.append(out)
        return out

    monkeypatch.setattr(loading, "build_linear", spy)
    model = load_gguf(path, CPU, "fp32", Q.QuantSpec("int4")).model
    assert len(model.quantization.kept) == len(built) - 1 >= 8  # and the head, from floats


def test_gguf_int8_requantizes_and_logs_the_error(tmp_path, caplog):
    hf = write_checkpoint(tmp_path / "hf", {}, seed=8)
    path = write_gguf(hf, tmp_path / "m.gguf", "qwen3", GT.Q8_0)
    with caplog.at_level("WARNING", logger="fermi.gguf"):
        model = load_gguf(path, CPU, None, Q.QuantSpec("int8")).model
    assert not model.quantization.kept
    assert "weights stored as Q8_0" in caplog.text and "relative error mean" in caplog.text
    assert max(model.quantization.errors.values()) < 0.01


# -- the Triton kernels, run by Triton's interpreter on CPU --------------------------------

INTERPRETED = Path(__file__).with_name("quant_kernels_interpreted.py")


def test_triton_kernels_under_the_interpreter_match_their_references():
    """The one-row kernels (bf16 weights, int8, int4; each fusion) and the few-row kernel,
    run on CPU tensors by Triton's interpreter in a fresh process (the variable must be
    set before the kernels are defined). bf16 ``tl.dot`` is wrong under the interpreter
    (bit patterns taken for integers), so the few-row kernel is checked in fp32 and fp16
    here and in bf16 on the GPU (tests/test_quant_cuda.py). Also the PDL products' dispatch:
    traced by torch.compile as their opaque ops (their launches run plainly here)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(INTERPRETED.parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(INTERPRETED)], capture_output=True, text=True, env=env, timeout=240
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= 45
    assert sum(case.startswith("pdl op traced") for case in results) == 4
    for case, (error, tolerance) in results.items():
        assert error <= tolerance, case


def test_quantizing_a_built_decoder_equals_quantizing_while_loading(folder):
    """``quantize_decoder`` (what the GPU benchmark uses on random weights) builds the same
    layers as the loader; a second pass is refused."""
    plain = load_folder(folder, CPU, torch.float32).model
    loaded = load_folder(folder, CPU, torch.float32, Q.QuantSpec("int4")).model
    report = Q.quantize_decoder(plain, Q.QuantSpec("int4"))
    assert plain.quantization is report and report.nbytes == loaded.quantization.nbytes
    assert torch.equal(prompt_logits(plain), prompt_logits(loaded))
    with pytest.raises(ValueError, match=r"qkv_proj is a QuantLinear, not a float nn\.Linear"):
        Q.quantize_decoder(plain, Q.QuantSpec("int8"))


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_projection_biases_survive_quantization(tmp_path, scheme):
    folder = write_checkpoint(tmp_path / "bias", {"attention_bias": True}, seed=9)
    plain = load_folder(folder, CPU, torch.float32).model
    model = load_folder(folder, CPU, torch.float32, Q.QuantSpec(scheme)).model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.bias, plain.model.layers[0].self_attn.qkv_proj.bias)
    assert rel(prompt_logits(model), prompt_logits(plain)) < (0.05 if scheme == "int8" else 0.3)


def test_int4_on_a_width_that_is_no_multiple_of_the_group_is_refused_naming_the_layer(tmp_path):
    folder = write_checkpoint(tmp_path / "odd", {"hidden_size": 48, "head_dim": 12}, seed=1)
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.0\.self_attn\.qkv_proj"):
        load_folder(folder, CPU, torch.float32, Q.QuantSpec("int4"))
    assert load_folder(folder, CPU, torch.float32, Q.QuantSpec("int8")).model.quantization


@NEEDS_SMOLLM2
@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_smollm2_quantized_keeps_its_q4_1_codes_under_int4_and_answers_paris(scheme):
    with fermi.load("smollm2-135m", quantize=scheme, max_seq_len=256, max_batch=1) as engine:
        report = engine.runner.model.quantization
        if scheme == "int4":  # every layer's Q4_1 codes; the head from the Q8_0 embeddings
            assert len(report.kept) == 120 and list(report.errors) == ["lm_head"]
        else:
            assert not report.kept and len(report.errors) == 121
        out = engine.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
    assert "Paris" in out.text


def test_serve_config_carries_quantize_to_every_replica(folder):
    """``fermi serve --quantize`` travels to the worker in ServerConfig's JSON."""
    from fermi.server.app import build_api
    from fermi.server.config import ServerConfig

    config = ServerConfig(model=str(folder), quantize="int8", max_seq_len=64, max_batch=1)
    api = build_api(msgspec.json.decode(config.to_env(), type=ServerConfig))
    try:
        model = api.pool.replicas[0].engine.runner.model
        assert model.quantization.spec == Q.QuantSpec("int8")
    finally:
        api.close()


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def test_the_quantized_launch_rules_give_legal_tiles_for_every_shape():
    """The launch rules of the int8/int4 kernels (``gemv.launch_config`` for one-byte
    weights, ``launch_config_int4``, ``quant_mm.few_rows_config``) over K in steps of 16 and
    widths from 1 to a vocabulary: ``tl.arange`` needs power-of-two blocks, the int4 kernels
    whole groups a step (and at least 16 bytes of a row), the few-row kernel's
    [BLOCK_N, GROUPS, HALF] cut a power-of-two group count; the Qwen3 products get the
    configurations the H200 sweep chose (perf/LOG.md run 64)."""
    from fermi.models import quant_mm as QM

    bad = []
    for k in range(16, 20000, 16):
        for n in (1, 24, 37, 2048, 4095, 4096, 151936):
            bn, bk, _, _ = G.launch_config(n, k, 1)
            if not (_power_of_two(bn) and _power_of_two(bk) and bk >= 16):
                bad.append(("int8", n, k, bn, bk))
            for group in (32, 64, 128):
                if k % group:
                    continue
                bn, bk, _, _ = G.launch_config_int4(n, k, group)
                if not (_power_of_two(bn) and _power_of_two(bk) and bk % group == 0):
                    bad.append(("int4", n, k, group, bn, bk))
                for int4 in (False, True):
                    bn, bk, _, _ = QM.few_rows_config(n, k, int4, group)
                    legal = _power_of_two(bn) and _power_of_two(bk) and bk >= 32
                    if int4:
                        legal = legal and bk % group == 0 and _power_of_two(bk // group)
                    if not legal:
                        bad.append(("few", int4, n, k, group, bn, bk))
    assert bad == []
    # (n, k): Qwen3-8B's down and gate_up, Qwen3-1.7B's o and down.
    assert G.launch_config(4096, 12288, 1) == (2, 2048, 4, 1)
    assert G.launch_config(24576, 4096, 1) == (4, 512, 4, 1)
    assert G.launch_config(2048, 2048, 1) == (2, 1024, 4, 1)
    assert G.launch_config_int4(24576, 4096, 32) == (8, 4096, 4, 1)
    assert G.launch_config_int4(2048, 6144, 32) == (2, 2048, 4, 1)
    assert QM.few_rows_config(4096, 12288, True, 32) == (32, 256, 4, 3)
    # 2-byte weights keep the H100 sweep's rule.
    assert G.launch_config(4096, 4096, 2) == (4, 1024, 8, 1)
