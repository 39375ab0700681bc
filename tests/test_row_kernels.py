"""Decoder.use_row_kernels(): one-token forwards through the fused row products.

On CPU the products run as their torch reference (``gemv_reference``), which checks the
layer's plumbing: the same logits as the unfused layer for every architecture that takes
the path. On CUDA the Triton kernel is checked against the reference, and the compiled
graph runner with the row products against the same runner without them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fermi.models import decoder as decoder_module
from fermi.models import gemv as G
from fermi.models.half_weights import use_half_weights
from tests.test_fuse_projections import CONFIGS, random_decoder

cuda = pytest.mark.skipif(not G.available(), reason="needs CUDA and Triton")
hopper = pytest.mark.skipif(
    not (G.available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="programmatic dependent launch needs a GPU of compute capability 9.0 or later",
)


# The row products launched plainly, then with programmatic dependent launch.
LAUNCHES = pytest.mark.parametrize(
    "pdl", [False, pytest.param(True, marks=hopper)], ids=["plain", "pdl"]
)


def decode_logits(model, steps: int = 6) -> torch.Tensor:
    """A 9-token prefill then ``steps`` one-row greedy decode steps in slot 1."""
    model.setup_cache(max_batch=2, max_seq_len=64)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 9))
    slot = torch.tensor([1])
    out = []
    with torch.inference_mode():
        logits = model(prompt, torch.arange(9)[None], slot, kv_len=9)
        for step in range(steps):
            out.append(logits)
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, torch.tensor([[9 + step]]), slot, kv_len=16)
    return torch.cat(out)


@pytest.mark.parametrize("name", ["qwen3", "llama_bias", "phi3_window"])
def test_row_products_give_the_unfused_logits(name):
    plain = random_decoder(CONFIGS[name]())
    rows = copy.deepcopy(plain)
    assert rows.use_row_kernels()
    assert (decode_logits(rows) - decode_logits(plain)).abs().max().item() < 1e-4


def test_one_row_steps_take_the_fused_path_and_wider_ones_do_not(monkeypatch):
    model = random_decoder(CONFIGS["qwen3"]())
    assert model.use_row_kernels()
    calls = []

    def spy(*args, pdl, **kw):
        calls.append(kw.get("act", 0))
        return G.gemv_reference(*args, **kw)

    monkeypatch.setattr(decoder_module, "row_linear", spy)
    model.setup_cache(max_batch=2, max_seq_len=32)
    with torch.inference_mode():
        model(torch.tensor([[3, 4]]), torch.tensor([[0, 1]]), torch.tensor([0]), kv_len=2)
        # A two-token prefill: only its last row's lm_head is a one-row product.
        assert len(calls) == 1
        calls.clear()
        model(torch.tensor([[5]]), torch.tensor([[2]]), torch.tensor([0]), kv_len=3)
    layers = model.cfg.num_hidden_layers
    assert len(calls) == 4 * layers + 1
    assert calls.count(G.ACT_SILU_MUL) == layers


def test_every_position_logits_of_one_row_keep_the_plain_final_norm():
    """``last_only=False`` on a one-row batch keeps T rows for the lm_head: the one-row
    product (which takes a single row, as the Triton kernel does) must not get them."""
    plain = random_decoder(CONFIGS["llama_bias"]())
    rows = copy.deepcopy(plain)
    assert rows.use_row_kernels()
    prompt, positions, slot = torch.tensor([[3, 4, 5]]), torch.arange(3)[None], torch.tensor([0])
    got = []
    for model in (rows, plain):
        model.setup_cache(max_batch=1, max_seq_len=16)
        with torch.inference_mode():
            got.append(model(prompt, positions, slot, kv_len=3, last_only=False))
    assert got[0].shape == (1, 3, plain.cfg.vocab_size)
    assert (got[0] - got[1]).abs().max().item() < 1e-4


def test_row_linear_takes_one_row_on_every_device():
    w = torch.randn(8, 16)
    assert G.row_linear(torch.randn(1, 1, 16), w).shape == (1, 1, 8)
    with pytest.raises(ValueError, match="one row"):
        G.row_linear(torch.randn(1, 2, 16), w)


def test_architectures_the_products_cannot_express_keep_the_plain_layer():
    gemma = random_decoder(CONFIGS["gemma2"]())
    assert not gemma.use_row_kernels()  # sandwich norms, (1 + weight), GELU
    for layout in ("plain", "fbgemm"):  # fp16 storage only in fermi's kernels' layout
        half = use_half_weights(random_decoder(CONFIGS["qwen3"]()), layout)
        assert not half.use_row_kernels()
        assert not any(layer.row_kernels for layer in half.model.layers)


def test_fermi_pdl_is_read_strictly_and_only_asks_for_pdl_where_it_runs(monkeypatch):
    monkeypatch.setenv("FERMI_PDL", "yes")
    with pytest.raises(ValueError, match="FERMI_PDL must be 0 or 1, got 'yes'"):
        G.pdl_wanted(torch.device("cpu"))
    monkeypatch.setenv("FERMI_PDL", "0")
    assert not G.pdl_wanted(torch.device("cuda"))
    monkeypatch.setenv("FERMI_PDL", "1")
    assert not G.pdl_wanted(torch.device("cpu"))
    monkeypatch.delenv("FERMI_PDL")  # off unless asked for
    assert not G.pdl_wanted(torch.device("cuda"))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(37, 100), (4096, 2560), (1000, 3072)])
@LAUNCHES
def test_triton_kernel_equals_the_reference(dtype, n, k, pdl):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    kw = {"device": "cuda", "dtype": dtype, "generator": g}
    w = torch.randn(n, k, **kw) * 0.05
    x, x2 = torch.randn(1, k, **kw), torch.randn(1, 2 * k, **kw)
    norm_w, bias, res = torch.rand(k, **kw) + 0.5, torch.randn(n, **kw), torch.randn(1, n, **kw)
    cases = [
        ({}, x),
        ({"norm_weight": norm_w, "eps": 1e-5}, x),
        ({"bias": bias, "norm_weight": norm_w}, x),
        ({"residual": res}, x),
        ({"act": G.ACT_SILU_MUL, "residual": res, "bias": bias}, x2),
    ]
    for extra, inp in cases:
        got = G.gemv(inp, w, **extra, pdl=pdl).float()
        want = G.gemv_reference(inp, w, **extra).float()
        scale = want.abs().max().item()
        # fp32: only the order of the sums differs; bf16: also one rounding of the output
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got - want).abs().max().item() <= tol * scale, extra


@hopper
@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_pdl_products_chained_in_one_cuda_graph_wait_for_their_inputs(scheme):
    """Four layers of a decoder's four products (q/k/v, o, gate/up, down; each reading the
    previous one's output) captured in one CUDA graph with PDL. Every output and the input
    of the chain are poisoned (NaN) before each replay and the input then written: a product
    that read its input before the kernel writing it had finished would see NaN or the
    previous replay's values. Fresh inputs each replay, against the unfused torch ops in
    float32 on the same (dequantized) weights."""
    from fermi.models import quant as Q

    g = torch.Generator(device="cuda").manual_seed(7)
    dt, h, q, inter = torch.bfloat16, 1024, 2048, 3072
    shapes = [(q, h), (h, q), (2 * inter, h), (h, inter)]
    layers = []
    for _ in range(4):
        mats = [torch.randn(n, k, device="cuda", generator=g) * 0.03 for n, k in shapes]
        if scheme == "bf16":
            linears = [(m.to(dt), m.to(dt)) for m in mats]
        else:  # (the layer, its weight as the kernels see it)
            quantize = Q.quantize_int8 if scheme == "int8" else Q.quantize_int4
            linears = [
                (Q.QuantLinear(w, None, "cuda", dt), Q.device_precision(w, "cuda").dequantize(dt))
                for w in map(quantize, mats)
            ]
        norms = [torch.rand(h, device="cuda", generator=g).to(dt) + 0.5 for _ in range(2)]
        layers.append((linears, norms))

    def product(linear, x, **fused):
        layer, _ = linear
        if scheme == "bf16":
            return G.gemv(x, layer, **fused, pdl=True)
        return layer.row(x, **fused, pdl=True)

    def reference(linear, x, **fused):  # float32 throughout, from the same weights
        fused = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in fused.items()}
        return G.gemv_reference(x.float(), linear[1].float(), **fused)

    def chain(x, fn):
        outs = []
        for (qkv, o, gate_up, down), (n1, n2) in layers:
            a = fn(qkv, x, norm_weight=n1)
            x = fn(o, a, residual=x)
            gu = fn(gate_up, x, norm_weight=n2)
            x = fn(down, gu, act=G.ACT_SILU_MUL, residual=x)
            outs += [a, gu, x]
        return outs

    x = torch.zeros(1, h, device="cuda", dtype=dt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x, product)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(x, product)
    for replay in range(3):
        fresh = torch.randn(1, h, device="cuda", generator=g).to(dt)
        for t in (*outs, x):
            t.fill_(float("nan"))
        x.copy_(fresh)
        graph.replay()
        want = chain(fresh, reference)
        for got, ref in zip(outs, want, strict=True):
            assert torch.isfinite(got).all(), replay
            err = (got.float() - ref).abs().max() / ref.abs().max()
            # bf16 rounds each of the 16 products' outputs (and silu * up): ~0.4% each
            assert err <= 5e-2, (replay, float(err))


@cuda
def test_compiled_runner_with_row_products_equals_it_without(tmp_path):
    from fermi.loading import load_folder
    from fermi.runners.torch_cuda import CudaGraphRunner
    from tests.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=3)
    device = torch.device("cuda")
    results = []
    for rows in (True, False):
        model = load_folder(folder, device, torch.float32).model
        runner = CudaGraphRunner(model, 2, 300, 32, row_kernels=rows, compile_cache=False)
        assert runner.row_kernels is rows
        logits = [runner.prefill(0, [5, 9, 14, 3, 7], 0)]
        for step in range(8):
            token = int(logits[-1].argmax())
            logits.append(runner.decode([0], [token], [5 + step])[0])
        results.append(torch.stack(logits))
    assert (results[0] - results[1]).abs().max().item() < 1e-4


@hopper
def test_compiled_runner_with_pdl_row_products_equals_it_without(tmp_path, monkeypatch):
    """FERMI_PDL=1 against FERMI_PDL=0 (the default): the same compiled runner's logits,
    the runner and its start-up record saying which it ran, and the products launched
    with PDL (counted as the compiled graphs run them) only with it."""
    from fermi.loading import load_folder
    from fermi.runners.torch_cuda import CudaGraphRunner
    from tests.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=4)
    device = torch.device("cuda")
    launched = {True: 0, False: 0}
    plain_launch = G.launch

    def counted(*args, pdl=False, **kw):
        launched[pdl] += 1
        return plain_launch(*args, pdl=pdl, **kw)

    monkeypatch.setattr(G, "launch", counted)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FERMI_PDL", flag)
        launched.update({True: 0, False: 0})
        model = load_folder(folder, device, torch.bfloat16).model
        runner = CudaGraphRunner(model, 2, 300, 32, compile_cache=False)
        assert runner.row_kernels and runner.pdl is (flag == "1")
        assert runner.startup.pdl is runner.pdl and model.row_pdl is runner.pdl
        logits = [runner.prefill(0, [5, 9, 14, 3, 7], 0)]
        for step in range(8):
            token = int(logits[-1].argmax())
            logits.append(runner.decode([0], [token], [5 + step])[0])
        results.append(torch.stack(logits).float())
        # (the triton_op's launches go through Inductor, not G.launch: only PDL's count)
        assert (launched[True] > 0) is (flag == "1"), launched
    assert torch.equal(results[0], results[1])
