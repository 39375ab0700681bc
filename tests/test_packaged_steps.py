"""The compiled runner's steps as AOTInductor packages (``FERMI_AOT=1``,
``fermi.runners.packaged``) on CPU, against the eager runner on the same tiny Qwen3: the first
start builds the packages into the compile cache, a second start loads them without Dynamo
compiling a frame, and both give the eager runner's logits and tokens. One build for the
module; the CUDA runner's packages are tested in tests/test_cuda.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fermi.engine.api import Engine
from fermi.loading import load_folder
from fermi.runners import packaged
from fermi.runners.select import torch_runner
from fermi.runners.torch_cuda import _compiled_frames
from tests.tiny import write_checkpoint

# Inductor's C++ compiles of four packages: ~1 minute on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CPU = torch.device("cpu")
# Two attended-length buckets (256, 384) and two chunk buckets (16, 32), so that the
# packages' dynamic sizes are used at more than the size they were exported with.
MAX_BATCH, MAX_SEQ, CHUNK = 4, 384, 32
# As tests/test_torch_compile_cpu.py: the same float32 arithmetic, reordered by Inductor.
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("packaged") / "qwen3", {})


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


def start(folder, compile_cache, name="torch-compile", aot="1"):
    ckpt = load_folder(folder, CPU, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERMI_COMPILE_CACHE", str(compile_cache))
        mp.setenv("FERMI_AOT", aot)
        frames = _compiled_frames()
        runner = torch_runner(ckpt.model, name, MAX_BATCH, MAX_SEQ, CHUNK, "full")
        runner.frames_compiled = _compiled_frames() - frames
    return Engine(runner, ckpt.tokenizer, ckpt.generation, "tiny", prefix_reuse=False)


@pytest.fixture(scope="module")
def engines(folder, compile_cache):
    made = [start(folder, compile_cache), start(folder, compile_cache, "torch-cpu", aot="0")]
    yield made
    for engine in made:
        engine.close()


def test_a_first_start_builds_the_packages_and_a_second_loads_them(engines, folder, compile_cache):
    first = engines[0].runner
    assert first.aot and first.startup.aot
    assert first.startup.packages_built_s > 0 and first.frames_compiled == 0
    (built,) = compile_cache.glob("*.aot")
    names = {p.name for p in built.glob("*.pt2")}
    # (On CPU the samplers run eagerly: see StepPackages.sampler.)
    assert names == {f"{n}.pt2" for n in packaged.STEPS}
    # No Inductor bundle: nothing was compiled through Dynamo.
    assert not list(compile_cache.glob("*.bin"))
    second = start(folder, compile_cache)
    try:
        stats = second.runner.startup
        assert stats.aot and stats.packages_built_s is None
        assert second.runner.frames_compiled == 0 and not stats.notes
    finally:
        second.close()


def test_packaged_logits_equal_eager_within_float32_reordering(engines):
    packed, eager = (e.runner for e in engines)
    vocab = packed.capabilities.vocab_size
    g = torch.Generator().manual_seed(0)
    # Slot 0: a causal first chunk of 32, then masked chunks after cached context (one of
    # 16 tokens, another padded to 16), past the first attended-length bucket of 256.
    prompts = {
        0: torch.randint(0, vocab, (290,), generator=g).tolist(),
        1: [7, 3, 11],
        2: torch.randint(0, vocab, (40,), generator=g).tolist(),
    }
    worst, last, pos = 0.0, {}, {}
    for slot, ids in prompts.items():
        for start_at in range(0, len(ids), CHUNK):
            chunk = ids[start_at : start_at + CHUNK]
            a, b = packed.prefill(slot, chunk, start_at), eager.prefill(slot, chunk, start_at)
            worst = max(worst, (a - b).abs().max().item())
        last[slot], pos[slot] = int(b.argmax()), len(ids)
    for _ in range(4):
        for slots in ([0, 1, 2], [1, 2], [1]):  # the 4-row, 2-row and one-row steps
            toks, where = [last[s] for s in slots], [pos[s] for s in slots]
            a, b = packed.decode(slots, toks, where), eager.decode(slots, toks, where)
            assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
            worst = max(worst, (a - b).abs().max().item())
            for i, s in enumerate(slots):
                last[s], pos[s] = int(b[i].argmax()), pos[s] + 1
    assert worst < TOL


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 11},
        {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 5},
    ],
)
def test_packaged_tokens_equal_eager(engines, settings):
    prompts = [[5, 77, 120, 33, 400, 9, 18], [100 + i for i in range(45)]]
    outs = [
        [
            e.generate(prompt_token_ids=p, max_tokens=20, ignore_eos=True, **settings).token_ids
            for p in prompts
        ]
        for e in engines
    ]
    assert outs[0] == outs[1]


def test_a_first_warm_up_loads_what_a_first_request_needs_and_builds_the_rest_when_idle(
    engines, folder, compile_cache, tmp_path
):
    # The module's packages without two of them: a `first` start builds nothing (its steps'
    # packages are there); the idle warm-up builds the two missing ones.
    (built,) = compile_cache.glob("*.aot")
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name)
    for name in ("decode", "prefill_masked"):
        (cache / built.name / f"{name}.pt2").unlink()
    ckpt = load_folder(folder, CPU, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERMI_COMPILE_CACHE", str(cache))
        mp.setenv("FERMI_AOT", "1")
        runner = torch_runner(ckpt.model, "torch-compile", MAX_BATCH, MAX_SEQ, CHUNK, "first")
    assert runner.startup.packages_built_s is None and runner.startup.deferred
    while runner.warm_more():
        pass
    assert set(runner._packages.built) == {"decode", "prefill_masked"}
    assert runner.startup.packages_built_s > 0
    assert (cache / built.name / "decode.pt2").is_file()


def test_a_package_that_does_not_load_is_built_again(engines, folder, compile_cache, tmp_path):
    (built,) = compile_cache.glob("*.aot")
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name)
    (cache / built.name / "decode1.pt2").write_bytes(b"PK\x03\x04 cut short")
    ckpt = load_folder(folder, CPU, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERMI_COMPILE_CACHE", str(cache))
        mp.setenv("FERMI_AOT", "1")
        runner = torch_runner(ckpt.model, "torch-compile", MAX_BATCH, MAX_SEQ, CHUNK, "first")
    assert set(runner._packages.built) == {"decode1"} and not runner.startup.notes
    assert runner.decode([0], [5], [0]).isfinite().all()


def test_the_packages_key_follows_the_models_code(tmp_path):
    # A newer fermi must not run an older one's packages: the key holds a digest of the
    # model's source (a changed file changes it).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "decoder.py").write_text("x = 1\n")
    (tmp_path / "sampling.py").write_text("")
    first = packaged.source_digest(tmp_path)
    assert packaged.source_digest(tmp_path) == first
    (tmp_path / "models" / "decoder.py").write_text("x = 2\n")
    assert packaged.source_digest(tmp_path) != first
    assert packaged.source_digest() != first  # (fermi's own files by default)


def test_a_failing_package_build_falls_back_to_torch_compile(folder, tmp_path, monkeypatch):
    from fermi.runners.torch_cuda import CudaGraphRunner

    def broken(self, name):
        raise RuntimeError(f"export of {name} failed")

    compiled = []  # (torch.compile itself is tested elsewhere: here the steps stay eager)
    monkeypatch.setattr(packaged.StepPackages, "build", broken)
    monkeypatch.setattr(CudaGraphRunner, "_compile", lambda self: compiled.append(self))
    monkeypatch.setenv("FERMI_COMPILE_CACHE", str(tmp_path))
    ckpt = load_folder(folder, CPU, torch.float32)
    runner = CudaGraphRunner(ckpt.model, 2, 64, 16, use_graphs=False, aot=True, warmup="first")
    assert not runner.aot and not runner.startup.aot and compiled == [runner]
    (note,) = runner.startup.notes
    assert note.startswith("packaged steps failed, compiling instead: RuntimeError: export of")
    eager = load_folder(folder, CPU, torch.float32).model
    reference = CudaGraphRunner(eager, 2, 64, 16, backend=None, use_graphs=False, warmup=False)
    got, want = runner.prefill(0, [5, 9, 14], 0), reference.prefill(0, [5, 9, 14], 0)
    assert torch.equal(got, want)


def test_a_folder_of_another_layout_is_emptied_before_use(tmp_path, engines):
    folder = tmp_path / "x.aot"
    folder.mkdir()
    (folder / "decode1.pt2").write_bytes(b"stale")
    (folder / "manifest.json").write_text(json.dumps({"format": packaged.FORMAT + 1}))
    steps = packaged.StepPackages(engines[0].runner, folder)
    steps._usable_folder()
    assert not (folder / "decode1.pt2").exists()
    assert json.loads((folder / "manifest.json").read_text())["format"] == packaged.FORMAT
    (folder / "decode1.pt2").write_bytes(b"kept")
    steps._usable_folder()  # the right layout: its packages stay
    assert (folder / "decode1.pt2").read_bytes() == b"kept"


@pytest.mark.parametrize("max_batch", [1, 3])
def test_every_package_exports_for_any_batch_size(folder, max_batch):
    # (Export only, the quick half of a build: the samplers are packaged on CUDA alone.)
    from fermi.runners.torch_cuda import CudaGraphRunner

    model = load_folder(folder, CPU, torch.float32).model
    runner = CudaGraphRunner(model, max_batch, 64, 16, backend=None, use_graphs=False)
    steps = packaged.StepPackages(runner, runner_folder := folder.parent / "unused.aot")
    names = ["decode1", "prefill_causal", "prefill_masked", *packaged.SAMPLERS.values()]
    names += ["decode"] if max_batch > 1 else []
    for name in names:
        module, args, dims = steps._export_args(name)
        with torch.no_grad():
            torch.export.export(module, args, dynamic_shapes=dims)
    assert not runner_folder.exists()


@pytest.mark.parametrize("value", ["2", "yes", "on"])
def test_fermi_aot_other_than_0_or_1_is_refused(monkeypatch, value):
    monkeypatch.setenv("FERMI_AOT", value)
    with pytest.raises(ValueError, match=f"FERMI_AOT must be 0 or 1, got '{value}'"):
        packaged.aot_wanted()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runner_refuses_packaged_steps_and_compiles(tmp_path, monkeypatch):
    """On the GPU it was tried on, loading a CUDA package crashed the process (LOG run 84):
    the CUDA runner says so and compiles its steps with torch.compile."""
    from fermi.runners.torch_cuda import CudaGraphRunner

    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=3)
    monkeypatch.setenv("FERMI_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FERMI_AOT", "1")
    model = load_folder(folder, torch.device("cuda"), torch.float32).model
    runner = CudaGraphRunner(model, 2, 300, 32, warmup="first")
    assert not runner.aot and not runner.startup.aot
    assert runner.startup.notes[0] == packaged.CUDA_REFUSED
    assert runner.startup.compiles > 0 and not list((tmp_path / "cache").glob("*.aot"))


def _package_folder(runner, root):
    runner._package_root = root
    runner._bind_packages()
    return runner._packages.folder.name


def test_the_packages_key_follows_the_cpu_its_threads_and_the_kernels_layout(
    folder, tmp_path, monkeypatch
):
    # Inductor's C++ code is compiled for this CPU (its vector ISA, -march=native) and its
    # thread count (one thread: serial loops), and a quantized layer's kernels follow
    # FERMI_NATIVE, none of it in the compile cache's key: a package built under one of
    # them must not be loaded under another (a shared cache folder, another
    # OMP_NUM_THREADS, FERMI_NATIVE=0).
    from fermi.models.quant import QuantLinear, QuantSpec
    from fermi.runners.torch_cuda import CudaGraphRunner

    model = load_folder(folder, CPU, torch.float32, quantize=QuantSpec.parse("int8")).model
    runner = CudaGraphRunner(model, 2, 64, 16, backend=None, use_graphs=False, warmup=False)
    key = _package_folder(runner, tmp_path)
    assert _package_folder(runner, tmp_path) == key
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert _package_folder(runner, tmp_path) != key
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as mp:
        mp.setenv("ATEN_CPU_CAPABILITY", "avx2")  # (Inductor's ISA, picked from it)
        assert _package_folder(runner, tmp_path) != key
    with monkeypatch.context() as mp:
        mp.setattr(packaged, "_cpu_identity", lambda: "another CPU")
        assert _package_folder(runner, tmp_path) != key
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    layout = layers[0].layout
    with monkeypatch.context() as mp:
        for layer in layers:
            mp.setattr(layer, "layout", "torch" if layout == "native" else "native")
        assert _package_folder(runner, tmp_path) != key


def test_packages_take_every_buffer_from_the_model_they_run(folder, tmp_path, monkeypatch):
    # A quantized layer reaches its kernel through a one-element ``_handle`` buffer; Inductor
    # inlines so small a tensor's value unless told to keep it a constant, and the package
    # then ran the layers of the model it was built from. Two models of one config in one
    # process (another checkpoint, or the same loaded again): the second loads the first's
    # packages and must give its own eager logits.
    from fermi.models.quant import QuantSpec
    from fermi.runners.torch_cpu_compiled import CompiledCpuRunner
    from fermi.runners.torch_cuda import CudaGraphRunner

    other = write_checkpoint(tmp_path / "other", {}, seed=3)
    monkeypatch.setenv("FERMI_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FERMI_AOT", "1")
    spec = QuantSpec.parse("int8")
    built = []
    for ckpt in (folder, other):
        model = load_folder(ckpt, CPU, torch.float32, quantize=spec).model
        runner = CompiledCpuRunner(model, 2, 64, 16, warmup="first")
        assert runner.aot and not runner.startup.notes
        built.append(set(runner._packages.built))
        ref = load_folder(ckpt, CPU, torch.float32, quantize=spec).model
        eager = CudaGraphRunner(ref, 2, 64, 16, backend=None, use_graphs=False, warmup=False)
        prompt = [5, 9, 14, 100, 7]
        got, want = runner.prefill(0, prompt, 0), eager.prefill(0, prompt, 0)
        assert (got - want).abs().max().item() < 1e-2 and got.argmax() == want.argmax()
        got, want = runner.decode([0], [3], [5]), eager.decode([0], [3], [5])
        assert (got - want).abs().max().item() < 1e-2 and got.argmax() == want.argmax()
    assert built == [{"prefill_causal", "decode1"}, set()]  # (the second loaded them)


def test_packaged_longrope_tokens_equal_eager_across_the_switch(tmp_path, monkeypatch):
    # LongRoPE's per-slot ``rope_long`` marks ([max_batch] bools, set between steps) must
    # reach the package as the model's buffer, not as the values they had at the build.
    from fermi.loading import GenerationDefaults
    from fermi.text.tokenizer import Tokenizer
    from tests.test_arch_phi3 import write

    folder = write(tmp_path, "longrope")
    monkeypatch.setenv("FERMI_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FERMI_AOT", "1")
    prompt = list(range(7, 19))  # 12 tokens: decoding crosses the switch at position 32
    outs = []
    for name in ("torch-compile", "torch-cpu"):
        model = load_folder(folder, CPU, torch.float32).model
        runner = torch_runner(model, name, 2, 128, 16, "first")
        engine = Engine(runner, Tokenizer.from_folder(folder), GenerationDefaults(), "phi")
        with engine:
            out = engine.generate(
                prompt_token_ids=prompt, max_tokens=40, temperature=0, ignore_eos=True
            )
        outs.append(out.token_ids)
        if name == "torch-compile":
            assert runner.inner.aot and not runner.inner.startup.notes
    assert outs[0] == outs[1]


def test_a_runner_without_a_compile_cache_removes_its_package_folder(folder):
    import gc

    from fermi.runners.torch_cuda import CudaGraphRunner

    model = load_folder(folder, CPU, torch.float32).model
    runner = CudaGraphRunner(model, 2, 64, 16, backend=None, use_graphs=False, warmup=False)
    runner._bind_packages()  # (as a warm-up with compile_cache=False does)
    root = runner._package_root
    assert root.is_dir()
    del runner
    gc.collect()
    assert not root.exists()
