"""ONNX export of the tiny Qwen3: onnxruntime reproduces the torch engine, through Fermi's
runner (cache updated in place), onnxruntime-genai's own generator, and the README's
plain-onnxruntime example."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fermi
from export.build import ExportError, ExportOptions, export_model
from export.onnx import quantize
from export.onnx_contract import readme_example
from export.verify import compare, greedy, sample_prompt
from fermi.errors import ModelLoadError
from fermi.grammar import Grammar
from fermi.loading import load_folder
from fermi.runners.artefact import read_manifest, sha256_file
from fermi.runners.onnx import OnnxRunner
from fermi.runners.torch_eager import TorchRunner
from tests.serving import NEEDS_SMOLLM2, REPO
from tests.tiny import write_checkpoint

SEQ = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    source = write_checkpoint(root / "ckpt", seed=3)
    lines: list[str] = []
    options = ExportOptions(
        model=str(source), target="onnx", out=root / "art", max_seq_len=SEQ, max_batch=3
    )
    manifest = export_model(options, progress=lines.append)
    return source, root / "art", manifest, lines


def torch_runner(source, max_batch=1):
    model = load_folder(source, torch.device("cpu"), torch.float32).model
    return TorchRunner(model, max_batch, SEQ, prefill_chunk=SEQ)


def test_greedy_64_tokens_identical_and_logits_within_1e3(exported):
    source, art, manifest, _ = exported
    runner = OnnxRunner(art, manifest, 1, SEQ, manifest.prefill_chunk)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(torch_runner(source), runner, prompt, steps=64)
    assert parity.tokens_equal, parity.summary()
    assert parity.max_logit_diff < 1e-3


def test_the_cache_is_written_in_place_in_the_runners_buffers(exported):
    """Past and present are one buffer: the graph's attention writes the step's entries
    into the runner's own tensors, at the step's positions of the step's slot only."""
    _, art, manifest, _ = exported
    runner = OnnxRunner(art, manifest, 3, SEQ, manifest.prefill_chunk)
    keys = runner.buffers[0]  # layer 0's keys [slots, kv_heads, positions, head_dim]
    runner.prefill(1, sample_prompt(manifest.vocab_size, 5, seed=1), 0)
    written = keys.abs().sum(dim=(1, 3)) > 0  # [slots, positions]
    assert written[1, :5].all() and not written[1, 5:].any()
    assert not written[0].any() and not written[2].any()
    runner.decode([1], [7], [5])
    written = keys.abs().sum(dim=(1, 3)) > 0
    assert written[1, :6].all() and not written[1, 6:].any()


def test_batched_decode_of_slots_at_different_positions_matches_torch(exported):
    source, art, manifest, _ = exported
    ours = OnnxRunner(art, manifest, 3, SEQ, manifest.prefill_chunk)
    ref = torch_runner(source, max_batch=3)
    prompts = [sample_prompt(manifest.vocab_size, n, seed=n) for n in (5, 17, 9)]
    tokens, positions = [], []
    for slot, prompt in enumerate(prompts):
        a, b = ours.prefill(slot, prompt, 0), ref.prefill(slot, prompt, 0)
        assert (a - b).abs().max() < 1e-3
        tokens.append(int(b.argmax()))
        positions.append(len(prompt))
    # Rows in another order than the slots, then scattered slots (two runs of the graph).
    for slots in ([2, 0, 1], [2, 0, 1], [2, 0], [1], [0, 2, 1]):
        ids = [tokens[s] for s in slots]
        pos = [positions[s] for s in slots]
        a, b = ours.decode(slots, ids, pos), ref.decode(slots, ids, pos)
        assert (a - b).abs().max() < 1e-3
        for row, s in enumerate(slots):
            tokens[s], positions[s] = int(b[row].argmax()), positions[s] + 1


def test_a_moved_slot_continues_where_its_source_was(exported):
    source, art, manifest, _ = exported
    ours = OnnxRunner(art, manifest, 3, SEQ, manifest.prefill_chunk)
    ref = torch_runner(source)
    prompt = sample_prompt(manifest.vocab_size, 9, seed=2)
    ours.prefill(2, prompt, 0)
    first = int(ref.prefill(0, prompt, 0).argmax())
    ours.move_slot(2, 0, len(prompt))
    a, b = ours.decode([0], [first], [len(prompt)]), ref.decode([0], [first], [len(prompt)])
    assert (a - b).abs().max() < 1e-3


def test_fermi_load_of_the_artefact_generates_what_the_torch_engine_generates(exported):
    source, art, _, _ = exported
    with (
        fermi.load(art) as onnx_engine,
        fermi.load(source, max_seq_len=SEQ, runner="torch-cpu") as torch_engine,
    ):
        assert onnx_engine.capabilities.name == "onnx"
        assert onnx_engine.max_batch == 3 and onnx_engine.max_seq_len == SEQ
        for kwargs in (
            {"prompt": "the quick brown fox"},
            {"messages": [{"role": "user", "content": "hello there"}], "thinking": "off"},
        ):
            a = onnx_engine.generate(**kwargs, max_tokens=32, temperature=0.0, ignore_eos=True)
            b = torch_engine.generate(**kwargs, max_tokens=32, temperature=0.0, ignore_eos=True)
            assert a.token_ids == b.token_ids and a.text == b.text


@pytest.mark.parametrize("shared", [True, False], ids=["share_buffer", "growing_cache"])
def test_onnxruntime_genai_generator_runs_the_folder_greedy_equal(exported, shared):
    og = pytest.importorskip("onnxruntime_genai")
    source, art, _, _ = exported
    config = json.loads((art / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    genai_config = og.Config(str(art))
    if not shared:
        genai_config.overlay(json.dumps({"search": {"past_present_share_buffer": False}}))
    model = og.Model(genai_config)
    prompt = [5, 17, 33, 101, 7]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 40)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    ours, _ = greedy(torch_runner(source), prompt, 40)
    assert theirs == ours


def test_the_readme_example_runs_with_plain_onnxruntime_and_matches_torch(exported):
    source, art, _, _ = exported
    example = readme_example((art / "README.md").read_text())
    assert len(example.strip().splitlines()) <= 25
    ids = ast.literal_eval(_run(example, cwd=art).splitlines()[0])
    assert ids == _capital_of_france(source, 16)


def test_the_project_readmes_onnxruntime_example_runs_on_the_folder_and_matches_torch(exported):
    """README.md's "Export to device" loop, which reads the cache shapes from the session,
    run as written on the exported folder."""
    source, art, _, _ = exported
    example = _project_readme_example("ort.InferenceSession")
    assert 'folder = "qwen3-onnx"' in example
    example = example.replace('folder = "qwen3-onnx"', f"folder = {str(art)!r}")
    example = example.replace(
        "print(tokenizer.decode(", "print(tokens[len(prompt):])\nprint(tokenizer.decode("
    )
    ids = ast.literal_eval(_run(example).splitlines()[0])
    assert ids == _capital_of_france(source, 16)


def test_the_project_readmes_onnxruntime_genai_example_runs_on_the_folder(exported):
    pytest.importorskip("onnxruntime_genai")
    source, art, _, _ = exported
    example = _project_readme_example("import onnxruntime_genai")
    assert 'og.Model("qwen3-onnx")' in example
    example = example.replace('"qwen3-onnx"', repr(str(art)))
    example += "print([int(t) for t in generator.get_sequence(0)])\n"
    sequence = ast.literal_eval(_run(example).strip().splitlines()[-1])
    tokenizer = load_folder(source, torch.device("cpu"), torch.float32).tokenizer
    prompt = tokenizer.encode(CAPITAL)
    assert sequence[: len(prompt)] == prompt
    generated = sequence[len(prompt) :]
    assert len(generated) > 8 and generated == _capital_of_france(source, len(generated))


CAPITAL = "The capital of France is"


def _run(example: str, cwd=None) -> str:
    """Run a README example in a fresh interpreter; its stdout."""
    res = subprocess.run(
        [sys.executable, "-c", example], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _project_readme_example(marker: str) -> str:
    """The Python block of README.md's "Export to device" that contains ``marker``."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Export to device") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(b for b in blocks if marker in b)


def _capital_of_france(source, steps: int) -> list[int]:
    """The torch engine's greedy continuation of the README examples' prompt."""
    tokenizer = load_folder(source, torch.device("cpu"), torch.float32).tokenizer
    expected, _ = greedy(torch_runner(source), tokenizer.encode(CAPITAL), steps)
    return expected


def test_onnxruntime_does_not_spin_between_ops_unless_asked(exported):
    """Spinning intra-op threads keep the cores busy while torch samples between steps."""
    _, art, manifest, _ = exported
    key = "session.intra_op.allow_spinning"
    quiet = OnnxRunner(art, manifest, 1, SEQ, manifest.prefill_chunk)
    spinning = OnnxRunner(art, manifest, 1, SEQ, manifest.prefill_chunk, spinning=True)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    assert spinning.session.get_session_options().get_session_config_entry(key) == "1"


def test_without_prepacking_the_runner_gives_the_same_logits(exported):
    """``prepack=False`` (what an export's check runs: a large model's weights are then
    read from their mapped file, not packed into a second copy) changes no token and moves
    logits only by float32 summation order."""
    _, art, manifest, _ = exported
    key = "session.disable_prepacking"
    packed = OnnxRunner(art, manifest, 1, SEQ, manifest.prefill_chunk)
    unpacked = OnnxRunner(art, manifest, 1, SEQ, manifest.prefill_chunk, prepack=False)
    assert unpacked.session.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the default
        packed.session.get_session_options().get_session_config_entry(key)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=7)
    a, logits_a = greedy(packed, prompt, 16)
    b, logits_b = greedy(unpacked, prompt, 16)
    assert a == b
    assert max(float((x - y).abs().max()) for x, y in zip(logits_a, logits_b, strict=True)) < 1e-4


def test_the_exports_check_runs_onnxruntime_without_prepacking(exported, tmp_path, monkeypatch):
    import fermi.runners.onnx as onnx_runner

    source, _, _, _ = exported
    made = []

    class Recorded(OnnxRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.session.get_session_options())

    monkeypatch.setattr(onnx_runner, "OnnxRunner", Recorded)  # export.build imports it late
    options = ExportOptions(model=str(source), target="onnx", out=tmp_path / "art", max_seq_len=SEQ)
    export_model(options, progress=lambda line: None)
    assert [o.get_session_config_entry("session.disable_prepacking") for o in made] == ["1"]


def test_each_weight_is_stored_once_in_the_layout_its_product_reads(exported):
    """The graph is traced on the meta device and its weights written from the model's
    tensors (export/onnx.py): every product reads an initializer [in, out] (no Transpose
    of a weight at run time but the tied table's, which the embedding also gathers from),
    and the file holds as many weight values as the model has, the tied table once."""
    import onnx
    from onnx import numpy_helper

    source, art, _, _ = exported
    graph = onnx.load(str(art / "model.onnx")).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    model = load_folder(source, torch.device("cpu"), torch.float32).model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == len(linears)
    for node in matmuls:
        weight = node.input[1]
        if weight not in values:  # the tied head: a Transpose of the embedding table
            transpose = producers[weight]
            assert transpose.op_type == "Transpose" and transpose.input[0] in values
    # (weights keep the model's names; the rope tables are the exporter's constants)
    stored = sum(v.size for name, v in values.items() if name.startswith("decoder."))
    assert stored == sum(p.numel() for p in model.parameters())  # (each tied tensor once)


def test_manifest_records_shapes_and_the_sha256_of_every_file(exported):
    _, art, manifest, _ = exported
    on_disk = {p.name for p in art.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest.files) == on_disk
    expected = {"model.onnx", "tokenizer.json", "config.json", "README.md", "genai_config.json"}
    assert expected <= on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(art / name) == digest
    assert read_manifest(art) == manifest
    names = {t.name: t.shape for t in manifest.inputs + manifest.outputs}
    assert names["input_ids"] == names["position_ids"] == ["batch_size", "sequence_length"]
    assert names["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert names["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert names["present.1.key"] == ["batch_size", 2, "present_sequence_length", 16]
    assert names["logits"] == ["batch_size", 1, manifest.vocab_size]
    assert manifest.max_seq_len == SEQ and manifest.max_batch == 3
    assert manifest.tools["onnxruntime"] and manifest.tools["torch"]
    assert manifest.numerics is not None and manifest.numerics.greedy_equal == [16] * 6


def test_progress_names_every_stage_and_the_check(exported):
    *_, lines = exported
    stages = [line for line in lines if line.startswith("[")]
    assert [s.split("]")[0] for s in stages] == [f"[{i}/5" for i in range(1, 6)]
    assert any("6/6 prompts keep all 16 greedy tokens" in line for line in lines)


def test_device_cuda_without_onnxruntimes_cuda_provider_is_an_error(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA (tests/test_export_onnx_cuda.py runs it)")
    with pytest.raises(ModelLoadError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        fermi.load(exported[1], device="cuda")


def test_another_dtype_than_the_exported_one_is_refused(exported):
    with pytest.raises(ModelLoadError, match=r"exported in fp32; it cannot run in fp16"):
        fermi.load(exported[1], dtype="fp16")


def test_int8_quantized_graph_is_smaller_and_tracks_the_engine(exported, tmp_path):
    source, art, manifest, _ = exported
    for name in manifest.files:
        if name != "model.onnx":
            shutil.copy(art / name, tmp_path / name)
    quantize(art / "model.onnx", tmp_path / "model.onnx", 8, {})
    import onnx

    ops = [node.op_type for node in onnx.load(tmp_path / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2 * 4  # qkv, o, gate_up, down per layer
    assert (tmp_path / "model.onnx").stat().st_size < (art / "model.onnx").stat().st_size
    runner = OnnxRunner(tmp_path, manifest, 1, SEQ, manifest.prefill_chunk)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(torch_runner(source), runner, prompt, steps=8)
    # Weight-only int8 in blocks of 32 (seen: 8 greedy tokens identical, logits within
    # 0.098 on the random tiny model, whose near-tied logits part easily).
    assert parity.first_divergence is None or parity.first_divergence > 2, parity.summary()
    assert parity.max_logit_diff < 0.3, parity.summary()


def test_an_fp16_export_runs_on_the_cpu_provider_close_to_the_engine(exported, tmp_path):
    """fp16 weights and cache (what the CUDA provider needs) run on the CPU too: the
    export's own check runs it there, and so does Fermi's runner."""
    source = exported[0]
    options = ExportOptions(
        model=str(source), target="onnx", out=tmp_path / "fp16", dtype="fp16", max_seq_len=SEQ
    )
    manifest = export_model(options, progress=lambda _: None)
    pasts = [t for t in manifest.inputs if t.name.startswith("past_key_values.")]
    assert manifest.cache.dtype == "float16" and {t.dtype for t in pasts} == {"float16"}
    assert next(t for t in manifest.outputs if t.name == "logits").dtype == "float32"
    runner = OnnxRunner(tmp_path / "fp16", manifest, 1, SEQ, manifest.prefill_chunk)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(torch_runner(source), runner, prompt, steps=16)
    # fp16 rounding of weights, cache and arithmetic against the fp32 engine (seen: 16
    # greedy tokens identical, logits within 5.1e-3).
    assert parity.first_divergence is None or parity.first_divergence > 4, parity.summary()
    assert parity.max_logit_diff < 5e-2, parity.summary()


def tampered_copy(art, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    return copy


def test_a_chat_template_the_manifest_does_not_list_is_refused(exported, tmp_path):
    _, art, _, _ = exported
    copy = tampered_copy(art, tmp_path)
    (copy / "chat_template.jinja").write_text("PWNED {{ messages[0]['content'] }}")
    with pytest.raises(ModelLoadError, match=r"has chat_template\.jinja, which manifest\.json"):
        fermi.load(copy)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"cache": {"layers": 5}}, r"cache\.layers is 5, but model\.onnx takes the caches of 2"),
        ({"cache": {"kv_heads": 1}}, r"cache\.kv_heads is 1, but model\.onnx's past_key_values"),
        ({"cache": {"head_dim": 8}}, r"cache\.head_dim is 8, but model\.onnx's past_key_values"),
        ({"vocab_size": 10}, r"vocab_size is 10, but model\.onnx writes logits over \d+ tokens"),
    ],
)
def test_a_manifest_that_disagrees_with_its_graph_is_refused_at_load(
    exported, tmp_path, edit, said
):
    """Checked at load against the graph's inputs and outputs: such an edit failed at the
    first step, in onnxruntime's words ("Failed to find input name ...")."""
    _, art, _, _ = exported
    copy = tampered_copy(art, tmp_path)
    raw = json.loads((copy / "manifest.json").read_text())
    for key, value in edit.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=rf"manifest\.json: {said}"):
        fermi.load(copy)


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_a_file_the_loader_reads_dropped_from_the_manifest_is_refused(exported, tmp_path, name):
    _, art, _, _ = exported
    copy = tampered_copy(art, tmp_path)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["files"][name]
    (copy / "manifest.json").write_text(json.dumps(raw))
    (copy / name).write_text(json.dumps({"temperature": 9.0, "chat_template": "PWNED"}))
    with pytest.raises(ModelLoadError, match=rf"has {re.escape(name)}, which manifest\.json"):
        fermi.load(copy)


def test_a_hub_cache_snapshot_of_symlinks_loads_and_still_checks_content(exported, tmp_path):
    """huggingface_hub stores a snapshot as symlinks into a blob folder."""
    _, art, _, _ = exported
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in art.iterdir():
        blob = blobs / sha256_file(file)
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    with fermi.load(snapshot) as engine:
        assert engine.generate(prompt="hi", max_tokens=4, temperature=0).token_ids
    (blobs / sha256_file(art / "tokenizer.json")).write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json does not match its sha256"):
        fermi.load(snapshot)


def test_a_grammar_constrains_the_onnx_runner_as_it_does_torch(exported):
    """Masks are applied in the base runner's sampling, so an artefact's runner follows a
    grammar too, token for token as the torch engine does."""
    source, art, _, _ = exported
    pattern = r"[a-z]{2,6}-[0-9]{1,4}"
    request = {"prompt": "Hi", "grammar": Grammar.regex(pattern), "max_tokens": 20, "seed": 3}
    with fermi.load(art) as onnx_engine:
        onnx = onnx_engine.generate(temperature=1.0, **request)
    with fermi.load(source, max_seq_len=SEQ, runner="torch-cpu") as torch_engine:
        ref = torch_engine.generate(temperature=1.0, **request)
    assert re.fullmatch(pattern, onnx.text), onnx.text
    assert onnx.finish_reason == "stop"
    assert onnx.token_ids == ref.token_ids


def test_a_gguf_file_exports_into_an_old_artefact_folder_leaving_nothing_stale(exported, tmp_path):
    """Any source fermi.load takes exports (here a Q8_0 GGUF file, whose tokenizer and
    config files the export writes); the old folder's files are all gone afterwards."""
    from gguf import GGMLQuantizationType

    from fermi.gguf import load_gguf
    from tests.gguf_files import write_gguf

    source, art, _, _ = exported
    gguf = write_gguf(source, tmp_path / "tiny.gguf", "qwen3", GGMLQuantizationType.Q8_0)
    out = tampered_copy(art, tmp_path)
    (out / "notes-from-an-old-export.txt").write_text("stale")
    manifest = export_model(
        ExportOptions(model=str(gguf), target="onnx", out=out, max_seq_len=SEQ, max_batch=1),
        progress=lambda _: None,
    )
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(manifest.files) | {"manifest.json"}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= on_disk
    assert manifest.source == str(gguf) and manifest.numerics.greedy_equal == [16] * 6
    reference = load_gguf(gguf, torch.device("cpu"), "fp32").model
    ours = OnnxRunner(out, manifest, 1, SEQ, manifest.prefill_chunk)
    parity = compare(TorchRunner(reference, 1, SEQ, prefill_chunk=SEQ), ours, [3, 9, 27], 24)
    assert parity.tokens_equal and parity.max_logit_diff < 1e-3, parity.summary()


def test_a_failed_export_leaves_the_earlier_one_untouched(exported, tmp_path):
    art = exported[1]
    out = tampered_copy(art, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    odd = write_checkpoint(tmp_path / "odd", {"head_dim": 12}, seed=1)
    with pytest.raises(ExportError, match="head_dim 12 is not a multiple of 8"):
        export_model(
            ExportOptions(model=str(odd), target="onnx", out=out, max_seq_len=SEQ),
            progress=lambda _: None,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".art.staging-*"))


def test_an_artefact_on_the_hub_downloads_every_file_its_manifest_lists(
    exported, tmp_path, monkeypatch
):
    """By Hub id: the first download (checkpoint patterns) brings manifest.json, the
    second exactly the files it lists: model.onnx and README.md match no checkpoint
    pattern."""
    import fnmatch

    import huggingface_hub

    art = exported[1]
    asked: list[list[str]] = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        assert repo_id == "someone/tiny-onnx"
        asked.append(list(allow_patterns))
        folder = tmp_path / "cache"
        folder.mkdir(exist_ok=True)
        for file in art.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, folder / file.name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with fermi.load("someone/tiny-onnx") as engine:
        assert engine.capabilities.name == "onnx"
    assert "model.onnx" not in asked[0] and {"model.onnx", "README.md"} <= set(asked[1])


def test_a_hub_id_whose_snapshot_is_symlinks_exports_with_real_files(
    exported, tmp_path, monkeypatch
):
    """By Hub id, from a cache snapshot that links every file into a blob store (how
    huggingface_hub stores one): the artefact gets the files' contents, not links."""
    import huggingface_hub

    source = exported[0]
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        blob = blobs / sha256_file(file)
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        assert repo_id == "someone/tiny-qwen3"
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "art"
    options = ExportOptions(model="someone/tiny-qwen3", target="onnx", out=out, max_seq_len=SEQ)
    manifest = export_model(options, progress=lambda _: None)
    assert manifest.source == "someone/tiny-qwen3" and manifest.numerics.greedy_equal == [16] * 6
    for name in ("tokenizer.json", "config.json", "model.onnx"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("weight_type", "quantize"), [("Q4_1", "int4"), ("Q4_0", "int4"), ("Q8_0", "int8")]
)
def test_a_gguf_sources_blocks_are_kept_exactly_in_the_fast_form(
    exported, tmp_path, weight_type, quantize
):
    """MatMulNBits with the file's own codes and scales: the graph computes the GGUF
    weights, so the quantized export reproduces the source as the fp32 one does (quantizing
    the dequantized weights again moved them by up to half a step). No node has a float
    zero point: onnxruntime's fast kernels take none (with them, SmolLM2's Q4_1 file
    decoded 7x slower, perf/LOG.md run 34). Q4_1's minimum is a float product of the
    blocks' sums beside each node."""
    from gguf import GGMLQuantizationType

    from tests.gguf_files import write_gguf

    path = tmp_path / f"{weight_type}.gguf"
    gguf = write_gguf(exported[0], path, "qwen3", GGMLQuantizationType[weight_type])
    lines: list[str] = []
    options = ExportOptions(
        model=str(gguf), target="onnx", out=tmp_path / "art", max_seq_len=SEQ, quantize=quantize
    )
    manifest = export_model(options, progress=lines.append)
    assert any("8 weights keep the GGUF file's Q4_0/Q4_1/Q8_0 blocks" in line for line in lines)
    import onnx

    graph = onnx.load(tmp_path / "art" / "model.onnx").graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 8 and all(len(n.input) == 3 for n in nbits)  # no zero points
    floats = [n for n in graph.node if n.op_type == "MatMul"]
    # The tied head stays float; Q4_1 adds one small product per kept weight.
    assert len(floats) == 1 + (8 if weight_type == "Q4_1" else 0)
    assert manifest.numerics.greedy_equal == [16] * 6
    assert manifest.numerics.max_logit_diff < 1e-3, manifest.numerics.summary()


def test_a_q4_1_block_whose_scale_is_zero_is_its_minimum():
    """Every weight of a Q4_1 block with d = 0 is m (llama.cpp writes such blocks, codes 0,
    for 32 equal weights); the offset form -m / d cannot say it. Each form a target reads
    gives m: the dequantized values (the check's reference), scale * (codes - offset)
    (Core ML's), scale * (codes - 8) + minimum + 8 * scale (ONNX's)."""
    from export.gguf_blocks import q4_1_blocks

    codes = np.zeros((1, 96), dtype=np.uint8)
    codes[0, 32:64] = 3
    codes[0, 64:] = 5
    d = np.array([[0.0, 0.5, 0.0]], dtype=np.float16)
    m = np.array([[0.25, -1.0, 2.0]], dtype=np.float16)
    blocks = q4_1_blocks(codes, d, m)
    # (the third block, d = 0 with codes that are not 0, is not what llama.cpp writes;
    # only its minimum says what it holds)
    want = np.array([0.25] * 32 + [0.5] * 32 + [2.0] * 32, dtype=np.float32)
    assert np.array_equal(blocks.dequantized()[0], want)
    scale = np.repeat(blocks.scale.astype(np.float32), 32, axis=1)[0]
    offset = np.repeat(blocks.offset, 32, axis=1)[0]
    minimum = np.repeat(blocks.minimum, 32, axis=1)[0]
    shift = scale * (codes[0] - offset)
    assert np.array_equal(shift[:64], want[:64])
    assert np.array_equal(scale * (codes[0] - 8.0) + minimum + 8.0 * scale, want)


@NEEDS_SMOLLM2
@pytest.mark.slow  # about 2 minutes on 2 cores: torch.export of 30 layers
def test_the_smollm2_alias_exports_and_reproduces_its_source(tmp_path):
    """The offline model by its alias (a Q4_1 GGUF file): the export's own check runs the
    six text prompts through onnxruntime and the dequantized source."""
    options = ExportOptions(model="smollm2-135m", target="onnx", out=tmp_path / "art")
    manifest = export_model(options, progress=lambda _: None)
    assert manifest.architecture == "LlamaForCausalLM" and manifest.source == "smollm2-135m"
    assert manifest.numerics.greedy_equal == [16] * 6
    assert manifest.numerics.max_logit_diff < 1e-3
    # The chat template and tokenizer the export wrote from the file's metadata serve a
    # chat as the file does.
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12}
    with fermi.load(tmp_path / "art") as engine:
        ours = engine.generate(**chat, temperature=0)
    with fermi.load("smollm2-135m", dtype="fp32", runner="torch-cpu", max_batch=1) as engine:
        theirs = engine.generate(**chat, temperature=0)
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text


def test_a_context_shorter_than_the_check_prompts_cuts_them_and_the_folder_is_readable(
    tmp_path,
):
    """--max-seq-len below the check's prompts (the tiny tokenizer writes them in 10-20
    tokens): each is cut to leave a position for one step, so the check runs instead of
    failing past the context. The folder takes the umask's mode, as mkdir gives, not the
    0700 of the staging folder it was built in."""
    source = write_checkpoint(tmp_path / "ckpt", seed=4)
    old = os.umask(0o022)
    try:
        options = ExportOptions(model=str(source), target="onnx", out=tmp_path / "a", max_seq_len=8)
        manifest = export_model(options, progress=lambda line: None)
    finally:
        os.umask(old)
    assert manifest.numerics is not None and manifest.numerics.greedy_equal == [1] * 6
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    for path in (tmp_path / "a").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_an_artefact_given_as_the_source_is_named_as_one(exported, tmp_path):
    """Re-exporting an export folder says it is an artefact and where its source is, not
    that a checkpoint lacks model.safetensors."""
    _, art, _, _ = exported
    options = ExportOptions(model=str(art), target="onnx", out=tmp_path / "again", max_seq_len=SEQ)
    with pytest.raises(ExportError, match=r"is an exported artefact .*'source' names it"):
        export_model(options, progress=lambda line: None)
    assert not (tmp_path / "again").exists()


def test_an_artefact_refuses_what_it_cannot_honour_before_loading_the_session(exported):
    """A KV cache the machine cannot hold is refused from the manifest's geometry before
    onnxruntime loads or the cache is allocated (it was an allocation error, or the OOM
    killer); a prefill chunk longer than the exported one and a bad warm-up value are
    refused, not quietly changed or ignored."""
    _, art, manifest, _ = exported
    with pytest.raises(ModelLoadError, match=r"the KV cache \(max_batch 100000000 x"):
        fermi.load(art, max_batch=10**8)
    with pytest.raises(
        ValueError, match=f"prefill_chunk must be between 1 and {manifest.prefill_chunk}"
    ):
        fermi.load(art, prefill_chunk=manifest.prefill_chunk + 1)
    with pytest.raises(ValueError, match="warmup must be one of"):
        fermi.load(art, warmup="bogus")


def test_an_earlier_export_survives_a_replacement_that_cannot_move_in(exported, tmp_path):
    """The earlier folder goes away only once the new one is in its place: before, it was
    deleted first, and a move that then failed (a mount point: EBUSY) left nothing."""
    from export import build

    out = tampered_copy(exported[1], tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    staging = tmp_path / "new"
    staging.mkdir()
    real, calls = os.replace, []

    def failing_second_move(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(16, "Device or resource busy")
        real(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build.os, "replace", failing_second_move)
        with pytest.raises(OSError, match="busy"):
            build._replace(out, staging)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".art.old-*"))


def test_an_out_folder_export_cannot_replace_is_refused_before_any_work(
    exported, tmp_path, monkeypatch
):
    from export import build

    source = str(exported[0])
    options = ExportOptions(model=source, target="onnx", out=tmp_path / "vol", max_seq_len=SEQ)
    monkeypatch.setattr(build.os.path, "ismount", lambda path: str(path).endswith("vol"))
    with pytest.raises(ExportError, match="is a mount point"):
        export_model(options, progress=lambda _: None)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    here = ExportOptions(model=source, target="onnx", out=Path("."), max_seq_len=SEQ)
    with pytest.raises(ExportError, match="holds the current folder"):
        export_model(here, progress=lambda _: None)
    proc = ExportOptions(model=source, target="onnx", out=Path("/proc/fermi-x"), max_seq_len=SEQ)
    with pytest.raises(ExportError, match="cannot write an export beside /proc/fermi-x"):
        export_model(proc, progress=lambda _: None)


def test_sigterm_stops_an_export_and_removes_its_staging_folder(exported, tmp_path):
    command = [sys.executable, "-m", "fermi.cli", "export", "--model", str(exported[0])]
    command += ["--target", "onnx", "--out", str(tmp_path / "art"), "--max-seq-len", "64"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.staging-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob(".art.staging-*")) and not (tmp_path / "art").exists()


def test_an_export_without_its_manifest_is_named_as_such(exported, tmp_path):
    out = tampered_copy(exported[1], tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match=r"holds model\.onnx but no manifest\.json"):
        fermi.load(out)
