"""Artefact folders: a manifest that does not fit its files is a clear load error."""

from __future__ import annotations

import json
import re
import sys

import pytest

import fermi
from export.build import ExportError, ExportOptions, check_options
from export.manifest import finalize
from fermi.errors import ModelLoadError
from fermi.runners.artefact import (
    FORMAT_VERSION,
    CacheSpec,
    Manifest,
    TensorSpec,
    load_artefact,
    read_manifest,
)
from tests.tiny import write_checkpoint


def fake_artefact(folder, target="onnx", model_file="model.onnx"):
    """A checkpoint's side files plus a stand-in model file, with a real manifest."""
    write_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    if not (folder / model_file).exists():
        (folder / model_file).write_bytes(b"not a real model")
    draft = Manifest(
        format_version=0,
        target=target,
        model_file=model_file,
        source="tiny",
        architecture="Qwen3ForCausalLM",
        dtype="fp32",
        quantize="none",
        max_seq_len=64,
        max_batch=2,
        prefill_chunk=64,
        vocab_size=453,
        cache=CacheSpec(2, 2, 16, "float32"),
        inputs=[TensorSpec("input_ids", ["batch", "query"], "int64")],
        outputs=[TensorSpec("logits", ["batch", 453], "float32")],
        states=[],
        tools={},
        files={},
    )
    return finalize(draft, folder)


def rewrite(folder, **changes):
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_a_valid_manifest_reads_back_with_its_checksums(tmp_path):
    written = fake_artefact(tmp_path)
    assert read_manifest(tmp_path) == written
    assert set(written.files) >= {"model.onnx", "tokenizer.json", "config.json"}


def test_unknown_format_version_names_the_version(tmp_path):
    fake_artefact(tmp_path)
    rewrite(tmp_path, format_version=99)
    with pytest.raises(ModelLoadError, match=r"format_version 99.*re-export"):
        fermi.load(tmp_path)


def test_missing_listed_file_names_the_file(tmp_path):
    fake_artefact(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing tokenizer\.json"):
        fermi.load(tmp_path)


def test_changed_file_is_a_checksum_mismatch(tmp_path):
    fake_artefact(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match=r"model\.onnx does not match its sha256"):
        fermi.load(tmp_path)


@pytest.mark.parametrize("name", ["../secret", "/tmp/secret"])
def test_a_listed_file_outside_the_folder_is_refused(tmp_path, name):
    art = tmp_path / "art"
    written = fake_artefact(art)
    (tmp_path / "secret").write_text("x")
    rewrite(art, files={**written.files, name: "0" * 64})
    with pytest.raises(ModelLoadError, match=rf"'{re.escape(name)}' lies outside"):
        fermi.load(art)


def test_manifest_that_is_not_json_or_lacks_fields_is_a_load_error(tmp_path):
    fake_artefact(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(ModelLoadError, match="missing required field"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("max_batch", 0, 1), ("prefill_chunk", -3, 1), ("vocab_size", 0, 1), ("max_seq_len", 1, 2)],
)
def test_a_manifest_size_that_cannot_run_names_the_manifest_and_field(
    tmp_path, field, value, bound
):
    fake_artefact(tmp_path)
    rewrite(tmp_path, **{field: value})
    with pytest.raises(
        ModelLoadError, match=rf"manifest\.json: Expected `int` >= {bound} - at `\$\.{field}`"
    ):
        fermi.load(tmp_path)


def test_runner_that_cannot_run_the_target_is_refused(tmp_path):
    fake_artefact(tmp_path)
    with pytest.raises(ModelLoadError, match="exported for onnx; runner 'torch-cpu' cannot run it"):
        load_artefact(tmp_path, runner="torch-cpu")


def test_longer_context_than_exported_is_refused(tmp_path):
    fake_artefact(tmp_path)
    with pytest.raises(ValueError, match="max_seq_len must be between 2 and 64"):
        load_artefact(tmp_path, max_seq_len=65)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the error shown off macOS")
def test_coreml_artefact_off_macos_says_where_it_runs(tmp_path):
    # A package is a folder: the manifest lists its inner files.
    (tmp_path / "model.mlpackage" / "Data").mkdir(parents=True)
    (tmp_path / "model.mlpackage" / "Data" / "model.mlmodel").write_bytes(b"stand-in")
    fake_artefact(tmp_path, target="coreml", model_file="model.mlpackage")
    with pytest.raises(ModelLoadError, match=r"Core ML runs only on macOS 15\+"):
        fermi.load(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target": "tflite"}, "target 'tflite'"),
        ({"target": "onnx", "quantize": "int2"}, "int2 is not available for onnx"),
        ({"target": "coreml", "dtype": "bf16"}, "dtype 'bf16'"),
        ({"target": "onnx", "max_seq_len": 1}, "max_seq_len must be at least 2"),
    ],
)
def test_bad_export_options_are_explained(tmp_path, changes, message):
    options = ExportOptions(**{"model": "m", "out": tmp_path / "out", **changes})
    with pytest.raises(ExportError, match=message):
        check_options(options)


def test_export_refuses_a_non_empty_folder_that_is_not_an_artefact(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        check_options(ExportOptions(model="m", target="onnx", out=tmp_path))


def test_compute_units_apply_to_core_ml_only_and_need_two_query_sizes(tmp_path):
    source = write_checkpoint(tmp_path / "ckpt", seed=4)
    onnx = ExportOptions(
        model=str(source), target="onnx", out=tmp_path / "o", compute_units="CPU_AND_NE"
    )
    with pytest.raises(ExportError, match="--compute-units applies to Core ML"):
        check_options(onnx)
    unknown = ExportOptions(
        model=str(source), target="coreml", out=tmp_path / "c", compute_units="GPU"
    )
    with pytest.raises(ExportError, match="is not one of ALL"):
        check_options(unknown)
    one = ExportOptions(
        model=str(source),
        target="coreml",
        out=tmp_path / "c",
        compute_units="CPU_AND_NE",
        prefill_chunk=1,
    )
    with pytest.raises(ExportError, match="needs --prefill-chunk 2 or more"):
        check_options(one)
