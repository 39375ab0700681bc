"""ONNX export of the tiny Qwen3: onnxruntime reproduces the torch engine."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fermi
from export.build import ExportOptions, export_model
from export.onnx import quantize_int8
from export.verify import compare, sample_prompt
from fermi.errors import ModelLoadError
from fermi.grammar import Grammar
from fermi.loading import load_folder
from fermi.runners.artefact import read_manifest, sha256_file
from fermi.runners.onnx import OnnxRunner
from fermi.runners.torch_eager import TorchRunner
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
    slots = [2, 0, 1]  # rows in another order than the slots
    for _ in range(8):
        ids = [tokens[s] for s in slots]
        pos = [positions[s] for s in slots]
        a, b = ours.decode(slots, ids, pos), ref.decode(slots, ids, pos)
        assert (a - b).abs().max() < 1e-3
        for row, s in enumerate(slots):
            tokens[s], positions[s] = int(b[row].argmax()), positions[s] + 1


def test_fermi_load_of_the_artefact_generates_what_the_torch_engine_generates(exported):
    source, art, _, _ = exported
    onnx_engine = fermi.load(art)
    torch_engine = fermi.load(source, max_seq_len=SEQ, runner="torch-cpu")
    try:
        assert onnx_engine.capabilities.name == "onnx"
        assert onnx_engine.max_batch == 3 and onnx_engine.max_seq_len == SEQ
        for kwargs in (
            {"prompt": "the quick brown fox"},
            {"messages": [{"role": "user", "content": "hello there"}], "thinking": "off"},
        ):
            a = onnx_engine.generate(**kwargs, max_tokens=32, temperature=0.0, ignore_eos=True)
            b = torch_engine.generate(**kwargs, max_tokens=32, temperature=0.0, ignore_eos=True)
            assert a.token_ids == b.token_ids and a.text == b.text
    finally:
        onnx_engine.close()
        torch_engine.close()


def test_manifest_records_shapes_and_the_sha256_of_every_file(exported):
    _, art, manifest, _ = exported
    on_disk = {p.name for p in art.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest.files) == on_disk
    assert {"model.onnx", "tokenizer.json", "config.json", "generation_config.json"} <= on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(art / name) == digest
    assert read_manifest(art) == manifest
    names = {t.name: t.shape for t in manifest.inputs + manifest.outputs}
    assert names["past_keys"] == [2, "batch", 2, "past", 16]
    assert names["new_values"] == [2, "batch", 2, "query", 16]
    assert names["logits"] == ["batch", manifest.vocab_size]
    assert manifest.max_seq_len == SEQ and manifest.max_batch == 3
    assert manifest.tools["onnxruntime"] and manifest.tools["torch"]


def test_progress_names_every_stage_and_the_verification(exported):
    *_, lines = exported
    stages = [line for line in lines if line.startswith("[")]
    assert [s.split("]")[0] for s in stages] == [f"[{i}/5" for i in range(1, 6)]
    assert any("16 greedy tokens identical" in line for line in lines)


def test_int8_quantized_graph_is_smaller_and_tracks_the_engine(exported, tmp_path):
    source, art, manifest, _ = exported
    for name in manifest.files:
        if name != "model.onnx":
            shutil.copy(art / name, tmp_path / name)
    quantize_int8(art / "model.onnx", tmp_path / "model.onnx")
    import onnx

    ops = [node.op_type for node in onnx.load(tmp_path / "model.onnx").graph.node]
    assert ops.count("MatMulInteger") == 2 * 4  # qkv, o, gate_up, down per layer
    assert (tmp_path / "model.onnx").stat().st_size < (art / "model.onnx").stat().st_size
    runner = OnnxRunner(tmp_path, manifest, 1, SEQ, manifest.prefill_chunk)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(torch_runner(source), runner, prompt, steps=8)
    # Random tiny weights have near-tied logits, so greedy streams may part after a few
    # tokens; the logits stay close (seen: 0.14 while the streams agreed).
    assert parity.first_divergence != 0
    assert parity.max_logit_diff < 0.3, parity.summary()


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
