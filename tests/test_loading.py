"""Loading checkpoints: sharded files, and errors that name what is wrong."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fermi
from fermi.errors import ModelLoadError
from fermi.hub import resolve
from fermi.loading import load_folder
from tests.tiny import write_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("load") / "qwen3", {"tie_word_embeddings": False}
    )


@pytest.fixture
def folder(original, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(original, copy)
    return copy


def test_sharded_checkpoint_loads_to_the_same_weights(original, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    shutil.copytree(original, sharded)
    (sharded / "model.safetensors").unlink()
    ref = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = load_folder(original, CPU, torch.float32).model.state_dict()
    b = load_folder(sharded, CPU, torch.float32).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def mapped(path) -> bool:
    """Whether this process maps ``path`` (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_an_owned_load_lets_go_of_the_file_and_holds_the_same_weights(original, tmp_path):
    """By default the weights map the checkpoint file; ``owned=True`` (what an export
    loads) copies each tensor out, so no mapping outlives the load, and the weights are
    the same."""
    file = (tmp_path / "model.safetensors").resolve()
    shutil.copy(original / "model.safetensors", file)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (original / name).exists():
            shutil.copy(original / name, tmp_path / name)
    mapping = load_folder(tmp_path, CPU, torch.float32).model
    assert mapped(file)
    del mapping
    gc.collect()
    assert not mapped(file)
    owned = load_folder(tmp_path, CPU, torch.float32, owned=True).model.state_dict()
    assert not mapped(file)
    again = load_folder(tmp_path, CPU, torch.float32).model.state_dict()
    assert owned.keys() == again.keys()
    assert all(torch.equal(owned[k], again[k]) for k in owned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_cpu_engine_holds_its_weights_without_mapping_the_file(original):
    """``fermi.load`` on the CPU loads owned tensors: the engine computes from them for its
    whole life, and a mapping's pages would count beside them (perf/LOG.md run 50)."""
    file = (original / "model.safetensors").resolve()
    with fermi.load(str(original), device="cpu", max_batch=1, max_seq_len=64) as engine:
        out = engine.generate(prompt_token_ids=[5, 6, 7], max_tokens=2, ignore_eos=True)
        assert len(out.token_ids) == 2
        assert not mapped(file)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_is_named(folder, name):
    (folder / name).unlink()
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_folder(folder, CPU, torch.float32)


def test_missing_shard_is_named(folder):
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, folder / "part-1.safetensors")
    index = {
        "weight_map": {
            k: ("part-1.safetensors" if i < half else "part-2.safetensors")
            for i, k in enumerate(names)
        }
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"part-2\.safetensors"):
        load_folder(folder, CPU, torch.float32)


def test_unsupported_architecture_is_named(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"MambaForCausalLM.*Qwen3ForCausalLM"):
        load_folder(folder, CPU, torch.float32)


def test_shape_mismatch_names_the_tensor(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mlp\.(down|gate|up)_proj\.weight.*shape"):
        load_folder(folder, CPU, torch.float32)


def test_missing_tensor_is_named(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_folder(folder, CPU, torch.float32)


def test_corrupt_config_is_reported(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        load_folder(folder, CPU, torch.float32)


def _edit(path, change):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(change)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.json", "null", r"config\.json must hold a JSON object, not NoneType"),
        ("config.json", "[]", r"config\.json must hold a JSON object, not list"),
        ("generation_config.json", "[1]", r"generation_config\.json must hold a JSON object"),
        ("tokenizer_config.json", "[]", r"tokenizer_config\.json must hold a JSON object"),
        ("tokenizer_config.json", "{x", r"tokenizer_config\.json is not valid JSON"),
        ("tokenizer.json", "{", r"tokenizer\.json is not a tokenizer file"),
    ],
)
def test_a_model_file_that_is_not_what_it_should_be_is_named(folder, name, text, message):
    """Each file a model folder holds, written as something other than a JSON object (or a
    tokenizer), is a ModelLoadError naming the file (was: an AttributeError traceback)."""
    (folder / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("config.json", {"rms_norm_eps": "x"}, r"rms_norm_eps must be a finite number"),
        ("config.json", {"rms_norm_eps": -1}, r"rms_norm_eps = -1 must be positive"),
        ("config.json", {"architectures": "Qwen3ForCausalLM"}, r"architectures must be a list"),
        (
            "generation_config.json",
            {"eos_token_id": "x"},
            r"generation_config\.json: eos_token_id must be a token id",
        ),
        (
            "generation_config.json",
            {"eos_token_id": [99999]},
            r"generation_config\.json: eos_token_id 99999 is not a token id of this model",
        ),
        # Sampling defaults, checked at load (they failed every request, naming neither).
        (
            "generation_config.json",
            {"temperature": "hot"},
            r"generation_config\.json: temperature must be a number, not 'hot'",
        ),
        (
            "generation_config.json",
            {"top_p": 5},
            r"generation_config\.json: top_p must be in \(0, 1\], got 5\.0",
        ),
        (
            "generation_config.json",
            {"top_k": 1.5},
            r"generation_config\.json: top_k must be an integer, not 1\.5",
        ),
        (
            "generation_config.json",
            {"do_sample": "yes"},
            r"generation_config\.json: do_sample must be true or false",
        ),
        (
            "generation_config.json",
            {"top_k": "50.0"},
            r"generation_config\.json: top_k must be an integer, not '50\.0'",
        ),
        (
            "tokenizer_config.json",
            {"chat_template": 5},
            r"tokenizer_config\.json: chat_template must be a string",
        ),
        (
            "tokenizer_config.json",
            {"chat_template": [{"name": "default", "template": 5}]},
            r"tokenizer_config\.json: each entry of the chat_template list must be an object",
        ),
        (
            "tokenizer_config.json",
            {"chat_template": ["{{ messages }}"]},
            r"tokenizer_config\.json: each entry of the chat_template list must be an object",
        ),
    ],
)
def test_a_field_of_the_wrong_kind_is_named_with_its_file(folder, name, change, message):
    _edit(folder / name, change)
    with pytest.raises(ModelLoadError, match=message):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


def test_named_chat_templates_serve_the_default_one(folder):
    tool_use = "{{ 'TOOLS' }}{% for m in messages %}{{ m.content }}{% endfor %}"
    default = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    named = [{"name": "tool_use", "template": tool_use}, {"name": "default", "template": default}]
    _edit(folder / "tokenizer_config.json", {"chat_template": named})
    engine = fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)
    try:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert text == "<user>hi"
    finally:
        engine.close()
    # Named templates with none the default: the model has no chat template.
    _edit(folder / "tokenizer_config.json", {"chat_template": named[:1]})
    engine = fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)
    try:
        assert engine.tokenizer.chat_template is None
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be at least 1, not 0"),
        ({"max_batch": -3}, "max_batch must be at least 1, not -3"),
        ({"max_seq_len": 1}, "max_seq_len must be at least 2, not 1"),
        ({"prefill_chunk": 0}, "prefill_chunk must be at least 1, not 0"),
        ({"max_waiting": -1}, "max_waiting must be at least 0, not -1"),
        ({"max_batch": "8"}, "max_batch must be an integer, not '8'"),
        ({"prefix_reuse": "no"}, "prefix_reuse must be True or False, not 'no'"),
        ({"warm_grammars": 0}, "warm_grammars must be True or False, not 0"),
    ],
)
def test_engine_sizes_out_of_range_are_refused_before_loading(tmp_path, kwargs, message):
    """Checked before the model is looked up: the path does not even exist."""
    with pytest.raises(ValueError, match=message):
        fermi.load(tmp_path / "nowhere", device="cpu", **kwargs)


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_model_name_is_refused_not_read_as_this_folder(model):
    with pytest.raises(ValueError, match="model is empty"):
        fermi.load(model)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.complex64])
def test_a_torch_dtype_outside_the_named_ones_is_refused_before_loading(folder, dtype):
    """ "float64" was refused by name but torch.float64 loaded; torch.int8 failed inside
    load_state_dict."""
    with pytest.raises(ValueError, match=rf"dtype {dtype} is not one of torch\.float32"):
        fermi.load(folder, device="cpu", dtype=dtype, max_batch=1, max_seq_len=64)


def test_offline_mode_fails_clearly_for_an_uncached_id(monkeypatch, tmp_path):
    monkeypatch.setenv("FERMI_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="FERMI_OFFLINE"):
        resolve("Qwen/Qwen3-0.6B")


def test_offline_mode_finds_a_cached_snapshot(monkeypatch, tmp_path, original):
    """A model already in the Hugging Face cache loads with FERMI_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(original, snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("FERMI_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve("acme/tiny") == snap
    with fermi.load("acme/tiny", max_batch=1, max_seq_len=32) as engine:
        assert engine.model_name == "acme/tiny"


def test_nonexistent_local_path_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve(str(tmp_path / "nope"))


def test_bf16_load_casts_weights(original):
    ckpt = load_folder(original, CPU, torch.bfloat16)
    assert ckpt.model.lm_head.weight.dtype == torch.bfloat16


HUGE = 4294967295


def write_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("layers", [1_000_000, HUGE])
def test_absurd_layer_count_in_config_fails_at_once_naming_the_field(folder, layers):
    write_config(folder, num_hidden_layers=layers)
    with pytest.raises(ModelLoadError, match=rf"config\.json: num_hidden_layers = {layers} is"):
        load_folder(folder, CPU, torch.float32)


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", HUGE), ("vocab_size", HUGE), ("num_attention_heads", -1)],
)
def test_absurd_size_in_config_is_refused_naming_the_folder_and_field(folder, field, value):
    write_config(folder, **{field: value})
    with pytest.raises(ModelLoadError, match=rf"{folder.name}: config\.json: {field} = {value} is"):
        load_folder(folder, CPU, torch.float32)


def test_size_that_is_not_an_integer_is_a_load_error(folder):
    write_config(folder, hidden_size="64")
    with pytest.raises(ModelLoadError, match="hidden_size must be an integer, not '64'"):
        load_folder(folder, CPU, torch.float32)


@pytest.mark.timeout(60)
def test_max_position_embeddings_of_1e12_is_refused_even_with_a_short_max_seq_len(folder):
    write_config(folder, max_position_embeddings=1e12)
    with pytest.raises(ModelLoadError, match=r"max_position_embeddings = 1000000000000 is outside"):
        fermi.load(str(folder), device="cpu", max_seq_len=256)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_sliding_window": True, "sliding_window": HUGE}, r"sliding_window = \d+ is outside"),
        ({"use_sliding_window": True, "sliding_window": -4}, r"sliding_window = -4 is outside"),
        ({"use_sliding_window": True, "sliding_window": "wide"}, "sliding_window must be an int"),
        (
            {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention"]},
            r"layer_types has 1 entries for \d+ layers",
        ),
        (
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": "all"}
            | {"layer_types": None},
            "max_window_layers must be a non-negative integer",
        ),
        ({"rope_theta": 0}, r"rope_theta = 0\.0 must be positive"),
        ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
        (  # head_dim 16 (tiny): 3 of its values would be rotated, in halves of 1.5
            {"partial_rotary_factor": 0.1875},
            "partial_rotary_factor = 0.1875 rotates 3 of head_dim's 16 values; rope needs an even",
        ),
        (  # transformers 5 keeps the base inside rope_parameters: a zero there is no default
            {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
            r"rope_parameters\.rope_theta = 0\.0 must be positive",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling of type linear has no factor"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": -2.0}},
            r"rope_scaling\.factor = -2\.0 must be positive",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0}},
            "low_freq_factor .4.0. must be below high_freq_factor",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 0}},
            r"rope_scaling\.beta_fast = 0 must be positive",
        ),
        (
            {"rope_scaling": {"type": "dynamic-ish", "factor": 2.0}},
            "rope_type 'dynamic-ish' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
            | {"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 0}},
            "rope_scaling of type yarn has no factor",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 2.0,
                    "original_max_position_embeddings": HUGE,
                }
            },
            r"original_max_position_embeddings = \d+ is outside",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e6}},
            r"rope_parameters\.factor = 0 must be positive",
        ),
        ({"rope_scaling": "fast"}, "rope_scaling must be an object"),
        ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor = 1\.5 is outside"),
        ({"rope_theta": "big"}, "unreadable rope settings"),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else None,
)
def test_hostile_window_and_rope_values_are_refused_naming_the_key(folder, changes, message):
    # The tiny checkpoint's config is transformers 5's (rope_parameters); without it the
    # older keys (rope_theta, rope_scaling) are read.
    write_config(folder, **{"rope_parameters": None, **changes})
    with pytest.raises(ModelLoadError, match=message):
        load_folder(folder, CPU, torch.float32)


def test_a_misspelt_layer_kind_is_refused(folder):
    # Read as full attention, a misspelt (or another family's) kind would run another model.
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    kinds = ["sliding_atention"] + ["full_attention"] * (layers - 1)
    write_config(folder, use_sliding_window=True, sliding_window=8, layer_types=kinds)
    with pytest.raises(ModelLoadError, match="layer_types 'sliding_atention' is not one of"):
        load_folder(folder, CPU, torch.float32)


def test_a_real_window_and_rope_scaling_still_load(folder):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    write_config(
        folder,
        use_sliding_window=True,
        sliding_window=16,
        rope_parameters=None,
        rope_scaling=scaling,
    )
    with fermi.load(str(folder), device="cpu", max_seq_len=64) as engine:
        assert engine.generate(prompt="hi", max_tokens=2, ignore_eos=True).usage


def test_a_kv_cache_larger_than_free_memory_is_refused_before_it_is_allocated(
    original, monkeypatch
):
    import fermi.memory

    ckpt = load_folder(original, CPU, torch.float32)
    cfg = ckpt.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    # What the machine has free, as the check reads it, and a cache 4 KiB over it.
    cache = per_token * 8 * 256
    # Each load asks twice: for its weights (they fit), then for the cache (4 KiB short).
    answers = iter([1 << 40, cache - 4096, 1 << 40, cache - 4096])
    monkeypatch.setattr(fermi.memory, "free_memory", lambda device: next(answers))
    with pytest.raises(
        ModelLoadError, match=r"KV cache \(max_batch 8 x max_seq_len 256 x .* per token\) needs"
    ):
        fermi.load(str(original), device="cpu", max_batch=8, max_seq_len=256)
    with fermi.load(str(original), device="cpu", max_batch=7, max_seq_len=256) as engine:
        assert engine.max_batch == 7  # just under it: loads
    assert next(answers, None) is None  # both loads asked for both


def test_weights_larger_than_free_memory_are_refused_before_they_are_copied(original, monkeypatch):
    import fermi.memory

    monkeypatch.setattr(fermi.memory, "free_memory", lambda device: 1 << 10)
    with pytest.raises(
        ModelLoadError, match=r"its weights in torch.float32 needs .* and cpu has 1.0 KiB free"
    ):
        load_folder(original, CPU, torch.float32)


def test_free_memory_on_this_cpu_is_read():
    from fermi.memory import free_memory

    free = free_memory("cpu")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert free is not None and 0 < free <= total
    assert free_memory("meta") is None


def test_a_device_this_machine_lacks_is_a_clear_error(original):
    """A device torch does not parse, or one this machine has not got, is a ValueError
    naming it, before the weights are moved (torch's own error would come from inside the
    loader, and the CLI would print its traceback)."""
    with pytest.raises(ValueError, match="'bogus' is not a device torch knows"):
        fermi.load(original, device="bogus")
    with pytest.raises(ValueError, match="fermi runs models on cpu, cuda or mps"):
        fermi.load(original, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda': this torch sees no CUDA GPU"):
            fermi.load(original, device="cuda")
    else:
        with pytest.raises(ValueError, match=r"CUDA GPUs, 0\.\."):
            fermi.load(original, device=f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS backend is not available"):
            fermi.load(original, device="mps")


def test_the_cuda_runner_asked_for_on_a_cpu_model_is_refused(original, monkeypatch):
    """``runner="torch-cuda"`` is not quietly served by the CPU runner, and is refused
    before the weights load (an 8B checkpoint would load first, then fail)."""
    import fermi.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(fermi.loading, "load_folder", no_load)
    with pytest.raises(ValueError, match="runner 'torch-cuda' runs a model on a CUDA GPU"):
        fermi.load(original, device="cpu", runner="torch-cuda", max_seq_len=64)
    # An export's runner, for a checkpoint: said so (it was "not one of torch, ...", while
    # --help lists onnx and coreml among the runners).
    for name in ("onnx", "coreml"):
        with pytest.raises(ValueError, match=rf"runner '{name}' runs a `fermi export` artefact"):
            fermi.load(original, device="cpu", runner=name, max_seq_len=64)


def test_resolve_device_on_a_machine_with_two_gpus(monkeypatch):
    """The CUDA branch of the device check, on a machine made to report two GPUs (this
    test machine has none; the GPU suite loads on a real one): "cuda" and "cuda:1" pass
    as they are, "cuda:2" is refused naming the GPUs there are."""
    from fermi.runners.select import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"'cuda:2': there are 2 CUDA GPUs, 0\.\.1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("", False), ("0", False),
     ("false", False), ("no", False), ("off", False)],
)  # fmt: skip
def test_offline_mode_reads_its_variable_as_huggingface_hub_does(monkeypatch, value, on):
    from fermi.hub import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("FERMI_OFFLINE", value)
    assert offline() is on


def test_a_bad_fermi_warmup_is_refused_naming_the_variable(folder, monkeypatch):
    monkeypatch.setenv("FERMI_WARMUP", "bogus")
    with pytest.raises(ValueError, match="FERMI_WARMUP must be one of first, full, not 'bogus'"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


def test_sampling_defaults_that_read_as_numbers_still_load(folder):
    """What the request builder reads (float(), int()) loads as before: 50.0, "0.7"."""
    _edit(folder / "generation_config.json", {"top_k": 50.0, "temperature": "0.7", "top_p": 1})
    with fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64) as engine:
        assert (engine.generation.top_k, engine.generation.temperature) == (50.0, "0.7")
        assert engine.generate(prompt="x", max_tokens=2, seed=1).finish_reason == "length"


@pytest.mark.parametrize("where", ["added", "vocab"])
def test_a_tokenizer_id_past_the_models_vocabulary_is_refused_at_load(folder, where):
    """Each prompt with that token failed at request time; an id near 2**31 made the
    grammar compiler's view allocate 8 GB once the engine idled (a process abort)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    if where == "added":
        data["added_tokens"].append(
            {"id": 500, "content": "<big>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
        said = r"token '<big>' has id \d+"  # (tokenizers numbers it after the vocabulary)
    else:
        data["model"]["vocab"]["zzz"] = 2_147_483_000
        said = "token 'zzz' has id 2147483000"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=rf"tokenizer\.json: {said}, past the model's"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


def test_truncation_and_padding_in_tokenizer_json_never_touch_a_prompt(folder):
    """A tokenizer.json may carry encoder settings: they cut a 28-token prompt to 3, or
    padded it with id 0 (a huge fixed padding aborted the process)."""
    engine = fermi.load(folder, device="cpu", max_batch=1, max_seq_len=128)
    want = engine.build_request(prompt="the quick brown fox jumps over", max_tokens=1).prompt_ids
    engine.close()
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                          "stride": 0}  # fmt: skip
    data["padding"] = {"strategy": {"Fixed": 10**9}, "direction": "Right", "pad_to_multiple_of":
                       None, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}  # fmt: skip
    path.write_text(json.dumps(data))
    engine = fermi.load(folder, device="cpu", max_batch=1, max_seq_len=128)
    got = engine.build_request(prompt="the quick brown fox jumps over", max_tokens=1).prompt_ids
    engine.close()
    assert got == want and len(want) > 3


@pytest.mark.parametrize(
    ("name", "make", "said"),
    [
        ("config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
         "nests JSON arrays or objects too deeply"),
        ("config.json", lambda p: p.write_text('{"vocab_size": ' + "9" * 5000 + "}"),
         "holds a value that cannot be read"),
        ("config.json", lambda p: (p.unlink(), p.mkdir()), "is a folder, not a JSON file"),
        ("generation_config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
         "nests JSON arrays or objects too deeply"),
        ("tokenizer.json", lambda p: (p.unlink(), p.mkdir()), "is a folder, not a tokenizer"),
        ("chat_template.jinja", lambda p: p.write_bytes(b"caf\xe9 {{ x }}"), "is not UTF-8"),
        ("generation_config.json", lambda p: p.write_text('{"temperature": 1' + "0" * 400 + "}"),
         "temperature must be a number"),
    ],
)  # fmt: skip
def test_a_model_file_python_cannot_read_is_a_load_error_naming_it(folder, name, make, said):
    """A RecursionError, int's digit limit, IsADirectoryError, UnicodeDecodeError and
    OverflowError reached the caller, none naming the file."""
    make(folder / name)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(name)}.*{said}"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias"])
def test_a_config_switch_that_is_not_a_boolean_is_refused(folder, key):
    """ "false" (a string) read as true: the checkpoint's own lm_head was dropped for the
    embedding table, silently."""
    _edit(folder / "config.json", {key: "false"})
    with pytest.raises(ModelLoadError, match=rf"{key} must be true or false, not 'false'"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_weight_stored_as_integers_is_refused_naming_it(folder, dtype):
    """Cast to float before, silently: a bool norm read as 1.0, U8 embeddings as 0..255."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match=rf"'model\.norm\.weight' is stored as {dtype}"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


@pytest.mark.parametrize("value", [5, ["x"], "../elsewhere/model.safetensors", "/etc/passwd", ""])
def test_an_index_shard_that_is_not_a_file_of_the_folder_is_refused(folder, value):
    """A number or list in weight_map raised a TypeError; a path out of the folder was
    opened."""
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": value}})
    )
    with pytest.raises(ModelLoadError, match=r"weight_map\['model\.norm\.weight'\] = .* is not"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


def test_a_model_context_of_one_token_names_the_model_not_max_seq_len(folder):
    _edit(folder / "config.json", {"max_position_embeddings": 1})
    with pytest.raises(ModelLoadError, match=r"the model's context .* is 1 token"):
        fermi.load(folder, device="cpu", max_batch=1)


def test_a_pretraining_tp_that_is_no_integer_is_refused_naming_it(tmp_path):
    folder = write_checkpoint(
        tmp_path / "llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    )
    _edit(folder / "config.json", {"pretraining_tp": "x"})
    with pytest.raises(ModelLoadError, match="pretraining_tp must be an integer, not 'x'"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)


def test_a_tokenizer_that_cannot_encode_text_is_refused_at_load(folder):
    """A normalizer that panics (a BaseException) loaded, then escaped every handler of
    the first request."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"] = {"type": "Replace", "pattern": {"String": ""}, "content": "x" * 1000}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json cannot encode text"):
        fermi.load(folder, device="cpu", max_batch=1, max_seq_len=64)
