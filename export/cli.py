"""The ``fermi export`` click command (wired into ``fermi.cli`` lazily)."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import click

from export.build import COMPUTE_UNITS, DEFAULT_CHUNK, QUANTIZE, TARGETS, ExportOptions

# What each target imports, all from the `export` extra (pyproject.toml). Checked before the
# model loads: without them an export read and ran the checkpoint (~10 s for SmolLM2-135M)
# and then ended in a ModuleNotFoundError traceback.
TARGET_MODULES = {
    "onnx": ("onnx", "onnxscript", "onnx_ir", "onnxruntime"),
    "coreml": ("coremltools",),
}
INSTALL_EXTRA = "pip install 'fermi-infer[export]' (in a clone: pip install -e '.[export]')"


def missing_modules(target: str) -> list[str]:
    """The modules ``target`` needs that cannot be imported here."""
    missing = []
    for name in TARGET_MODULES[target]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken parent package, or a __spec__ of None
            found = False
        if not found:
            missing.append(name)
    return missing


# SIGTERMs received during an export. A converter may catch the exception the handler
# raises and raise its own (torch.onnx wraps what fails inside it): the export command
# looks at the signal, not at the exception that arrives (an exit status of 1 was seen).
_signals: list[int] = []


def _stop(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise SystemExit(128 + signum)


@click.command("export")
@click.option(
    "--model",
    "-m",
    envvar="FERMI_MODEL",
    required=True,
    show_envvar=True,
    help="Hugging Face id, checkpoint folder, .gguf file or alias to export.",
)
@click.option("--target", type=click.Choice(TARGETS), required=True, help="Artefact format.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder (created; an earlier export there is replaced).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="Weights and compute precision. [default: fp32 for onnx, fp16 for coreml]",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=2),
    default=None,
    help="Longest context the artefact supports. [default: model's, capped at 2048]",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Cache slots the runner allocates by default (fermi.load can change it). "
    "[default: 4 onnx; 1 coreml, where each slot is a whole Core ML state]",
)
@click.option(
    "--quantize",
    type=click.Choice(sorted({q for qs in QUANTIZE.values() for q in qs})),
    default="none",
    show_default=True,
    help="Weight-only quantisation: int8 (onnx: blocks of 32; coreml: per channel) or int4 "
    "(blocks of 32). A GGUF source's Q4_0/Q4_1/Q8_0 blocks are kept as they are.",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=None,
    help=f"Longest prompt chunk per call. [default: {DEFAULT_CHUNK['onnx']} onnx, "
    f"{DEFAULT_CHUNK['coreml']} coreml]",
)
@click.option(
    "--compute-units",
    type=click.Choice(COMPUTE_UNITS),
    default=None,
    help="Core ML: the compute units to convert for. CPU_AND_NE gives fixed (enumerated) "
    "shapes the Neural Engine runs, attending over the whole cache each step; the others "
    "give range shapes that attend over the live context. [default: ALL]",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check the exported model against its source on fixed prompts (greedy tokens, "
    "logits); the figures go into the manifest.",
)
def export_command(
    model: str,
    target: str,
    out: Path,
    dtype: str | None,
    max_seq_len: int | None,
    max_batch: int | None,
    quantize: str,
    prefill_chunk: int | None,
    compute_units: str | None,
    verify: bool,
) -> None:
    """Export a model to an ONNX or a stateful Core ML artefact folder."""
    missing = missing_modules(target)
    if missing:
        raise click.ClickException(
            f"--target {target} needs {', '.join(missing)}, from fermi's export extra: "
            f"{INSTALL_EXTRA}"
        )
    from export.build import Bar, export_model
    from fermi.errors import FermiError

    options = ExportOptions(
        model=model,
        target=target,
        out=out,
        dtype=dtype,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        quantize=quantize,
        prefill_chunk=prefill_chunk,
        verify=verify,
        compute_units=compute_units,
    )
    # A stop by SIGTERM (timeout, docker stop, a cancelled job) unwinds as Ctrl-C does, so
    # the staging folder is removed; it was left behind (up to the model's size).
    signal.signal(signal.SIGTERM, _stop)
    try:
        manifest = export_model(options, progress=Bar())
    except BaseException as exc:
        if _signals:  # (whatever the signal's exception became on its way out)
            raise SystemExit(128 + _signals[0]) from None
        if isinstance(exc, FermiError | ValueError):
            raise click.ClickException(str(exc)) from exc
        if isinstance(exc, OSError):  # the disk filled, or the folder went away, while writing
            where = exc.filename or out
            raise click.ClickException(
                f"writing the export failed: {where}: {exc.strerror}"
            ) from exc
        raise
    click.echo(
        f"exported {manifest.architecture} to {out} ({manifest.target}, {manifest.dtype}, "
        f"quantize {manifest.quantize}); load it with fermi.load({str(out)!r})"
    )
