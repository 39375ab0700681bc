"""The ``fermi`` command: chat, generate, serve, grpc, export.

Front-end commands that pull in heavy dependencies (the HTTP server, gRPC, exporters)
are imported only when invoked, so ``fermi --help`` and ``fermi chat`` start fast.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import sys
import time

import click

from fermi import DEFAULT_MODEL, warmup_from_env
from fermi.errors import RequestError

# name -> "module:attribute" of a click command, imported on first use.
LAZY_COMMANDS = {
    "serve": "fermi.server.cli:serve_command",
    "grpc": "fermi.rpc.cli:grpc_command",
    "export": "export.cli:export_command",
}


class FermiGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._available()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in LAZY_COMMANDS:
            return command
        module, attr = LAZY_COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise click.ClickException(f"`fermi {name}` is unavailable: {exc}") from exc

    @staticmethod
    def _available() -> list[str]:
        names = []
        for name, target in LAZY_COMMANDS.items():
            module = target.split(":")[0]
            try:
                if importlib.util.find_spec(module) is not None:
                    names.append(name)
            except ModuleNotFoundError:
                continue
        return names


def model_options(func):
    """Options every command that loads a model shares; flags win over the environment."""
    options = [
        click.option(
            "--model",
            "-m",
            envvar="FERMI_MODEL",
            default=DEFAULT_MODEL,
            show_default=True,
            show_envvar=True,
            help="Hugging Face id, checkpoint folder, .gguf file, export folder or alias.",
        ),
        click.option(
            "--device",
            default=None,
            help="cuda, cuda:1, mps, cpu. [default: cuda if available, else mps on Apple "
            "silicon, else cpu]",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
            default="auto",
            show_default=True,
            help="auto = bf16 on CUDA, fp16 on mps, fp32 on CPU.",
        ),
        click.option(
            "--max-seq-len",
            type=click.IntRange(min=2),
            default=None,
            help="Context length. [default: model's, capped at 4096]",
        ),
        click.option(
            "--max-batch",
            type=click.IntRange(min=1),
            default=None,
            help="Concurrent sequences. [default: 8, an export folder's own (4 unless "
            "exported with another); 1 for chat and generate]",
        ),
        click.option(
            "--runner",
            default=None,
            help="Force a runner: torch-cpu, torch-compile, torch-cuda, onnx, coreml.",
        ),
        click.option(
            "--quantize",
            type=click.Choice(["int8", "int4"]),
            default=None,
            help="Weight-only quantization of the linear layers (int4: groups of 32). "
            "[default: the checkpoint's precision]",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def refuse_taken_port(host: str, port: int) -> None:
    """Stop, before loading a model, when the server could not listen on ``host:port``.

    Granian listens with SO_REUSEPORT, so a second ``fermi serve`` on a taken port would not
    fail to bind: it would join the port and silently answer a share of the first server's
    connections. A connection that succeeds means someone listens there. A host that does
    not resolve, or is no address of this machine, stops the command too (its connection
    could reach another machine's server, or wait for a reply that never comes).
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]
    try:
        found = socket.getaddrinfo(name or "0.0.0.0", 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}: {exc.strerror or exc}") from None
    error = None
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(address)  # port 0: only whether the address is this machine's
            break
        except OSError as exc:
            error = exc
    else:
        raise click.ClickException(f"cannot listen on {host}: {error.strerror or error}")
    if port == 0:
        return
    probe = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(name, name)
    try:
        with socket.create_connection((probe, port), timeout=2):
            pass
    except OSError:  # refused (or silent): nobody listens; the bind will tell otherwise
        return
    raise click.ClickException(
        f"port {port} on {host} is already in use by another server; choose another --port"
    )


def command_line_warmup(engines: int = 1) -> str:
    """The command line's warm-up (``fermi.load``'s ``warmup``): ``FERMI_WARMUP`` if set,
    else "first" for a process that runs one engine: its first request need not wait for
    every graph, and nothing else in the process uses the GPU. Several engines in one
    process (``serve --pool``) warm up in full before serving, so that no engine captures
    a graph while another one runs."""
    try:
        return warmup_from_env("first" if engines == 1 else "full")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def load_engine(
    model,
    device,
    dtype,
    max_seq_len,
    max_batch,
    runner,
    prefix_reuse=True,
    quantize=None,
    warm_grammars=True,
):
    import fermi

    try:
        return fermi.load(
            model,
            device=device,
            dtype=dtype,
            max_seq_len=max_seq_len,
            max_batch=max_batch,
            runner=runner,
            prefix_reuse=prefix_reuse,
            quantize=quantize,
            warm_grammars=warm_grammars,
            warmup=command_line_warmup(),
        )
    except (fermi.FermiError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def load_terminal_engine(model, device, dtype, max_seq_len, max_batch, runner, quantize):
    """The engine of ``chat`` and ``generate``: one slot unless asked (and on CUDA no batch
    > 1 graphs to capture), and no grammar view held in memory (they never constrain)."""
    return load_engine(
        model,
        device,
        dtype,
        max_seq_len,
        max_batch or 1,
        runner,
        quantize=quantize,
        warm_grammars=False,
    )


@click.group(cls=FermiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fermi-infer")
def main() -> None:
    """Fermi Infer: fast inference for small language models."""


THINKING = click.Choice(["on", "off", "auto"])
# fermi.sampling.MAX_TEMPERATURE (not imported here: it imports torch, and --help should not)
TEMPERATURE = click.FloatRange(0.0, 100.0)


@main.command()
@model_options
@click.option(
    "--thinking", type=THINKING, default="auto", show_default=True, help="Reasoning mode."
)
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Per reply."
)
@click.option("--temperature", type=TEMPERATURE, default=None, help="[default: the model's]")
@click.option("--system", default=None, help="A system message that starts the conversation.")
def chat(
    model,
    device,
    dtype,
    max_seq_len,
    max_batch,
    runner,
    quantize,
    thinking,
    max_tokens,
    temperature,
    system,
):
    """Chat in the terminal. /reset clears the conversation, /exit (or Ctrl-D) quits."""
    engine = load_terminal_engine(model, device, dtype, max_seq_len, max_batch, runner, quantize)
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    dim, reset = ("\x1b[2m", "\x1b[0m") if color else ("", "")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    _check_opening(engine, history, thinking)
    click.echo(f"fermi chat · {engine.model_name} · {engine.capabilities.name} · /reset /exit")
    try:
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
                if sys.stdin.isatty():
                    click.echo()
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history = history[:1] if system else []
                click.echo("(conversation cleared)")
                continue
            history.append({"role": "user", "content": text})
            try:
                dropped = _fit_context(engine, history, thinking, max_tokens, bool(system))
                if dropped:
                    click.echo(f"(context full: dropped the {dropped} oldest messages)")
                reply = _stream_reply(
                    engine, history, thinking, max_tokens, temperature, dim, reset
                )
            except BrokenPipeError:
                raise
            except Exception as exc:  # keep the session alive after a failed turn
                history.pop()
                # (a RequestError's hint is for the Python API: truncate=True, ...)
                said = exc.message if isinstance(exc, RequestError) else exc
                click.echo(f"error: {said}", err=True)
                continue
            history.append({"role": "assistant", "content": reply})
    except BrokenPipeError:
        _closed_stdout()
    finally:
        engine.close()


def _check_opening(engine, history: list[dict], thinking) -> None:
    """Refuse, before the chat starts, what would fail every turn: a thinking mode the
    template cannot honour, a template that cannot render the conversation (none at all,
    or one that refuses a system message), a system message the context cannot hold."""
    try:
        opening = engine.chat_prompt([*history, {"role": "user", "content": "Hello"}], thinking)
    except RequestError as exc:
        engine.close()
        if exc.param == "thinking":
            raise click.BadParameter(
                f"{exc.message}; use --thinking auto or off", param_hint="--thinking"
            ) from None
        if history and _renders_without(engine, thinking):  # the system message is at fault
            raise click.BadParameter(exc.message, param_hint="--system") from None
        raise click.ClickException(exc.message) from None
    if len(opening.token_ids) >= engine.max_seq_len:
        engine.close()
        raise click.BadParameter(
            f"the system message and a first question take {len(opening.token_ids)} tokens "
            f"of this engine's context of {engine.max_seq_len}: shorten it, or raise "
            "--max-seq-len",
            param_hint="--system",
        )


def _renders_without(engine, thinking) -> bool:
    try:
        engine.chat_prompt([{"role": "user", "content": "Hello"}], thinking)
    except RequestError:
        return False
    return True


def _closed_stdout() -> None:
    """The reader of our output went away (``| head``): stop quietly, as a program killed
    by SIGPIPE would (status 141), without Python's complaint about flushing stdout."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)


def _fit_context(engine, history: list[dict], thinking, max_tokens: int, kept: bool) -> int:
    """Drop the oldest exchanges (never the system message, never the new question) until
    the conversation leaves room for a reply of ``max_tokens`` (at most a quarter of the
    context). Returns how many messages were dropped; when even the system message and the
    new question alone leave no room, drops nothing (the turn then fails on its own)."""
    limit = engine.max_seq_len
    room = max(1, min(max_tokens, limit // 4))
    first = 1 if kept else 0
    trial = list(history)
    while True:
        if len(engine.chat_prompt(trial, thinking).token_ids) + room <= limit:
            break
        if len(trial) - first <= 1:
            return 0  # (the question alone does not fit: keep the conversation as it was)
        # The oldest user message with the replies that followed it.
        end = first + 1
        while end < len(trial) - 1 and trial[end]["role"] != "user":
            end += 1
        del trial[first:end]
    dropped = len(history) - len(trial)
    history[:] = trial
    return dropped


def _stream_reply(engine, history, thinking, max_tokens, temperature, dim, reset) -> str:
    started = time.perf_counter()
    answer: list[str] = []
    in_reasoning = False
    first_at = None
    tokens = 0
    finish = "stopped"
    stream = engine.stream(
        messages=history, thinking=thinking, max_tokens=max_tokens, temperature=temperature
    )
    try:
        for delta in stream:
            tokens, first_at, in_reasoning = _show_delta(
                delta, tokens, first_at, in_reasoning, answer, dim, reset
            )
            finish = delta.finish_reason or finish
    except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on
        stream.close()  # (cancels the request)
        finish = "stopped by Ctrl-C"
    if in_reasoning:
        click.echo(reset, nl=False)
    elapsed = time.perf_counter() - (first_at or started)
    rate = (tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else 0.0
    click.echo(f"\n{dim}[{tokens} tokens · {rate:.1f} tok/s · {finish}]{reset}")
    return "".join(answer)


def _show_delta(delta, tokens, first_at, in_reasoning, answer, dim, reset):
    """Print one streamed delta; the updated (tokens, first_at, in_reasoning)."""
    if first_at is None and delta.token_ids:
        first_at = time.perf_counter()
    tokens += len(delta.token_ids)
    if delta.reasoning:
        if not in_reasoning:
            click.echo(f"{dim}[thinking] ", nl=False)
            in_reasoning = True
        click.echo(delta.reasoning, nl=False)
    if delta.text:
        if in_reasoning:
            click.echo(f"{reset}\n[answer] ", nl=False)
            in_reasoning = False
        click.echo(delta.text, nl=False)
        answer.append(delta.text)
    sys.stdout.flush()
    return tokens, first_at, in_reasoning


@main.command()
@model_options
@click.argument("prompt")
@click.option(
    "--chat/--raw", "as_chat", default=True, show_default=True, help="Apply the chat template."
)
@click.option("--thinking", type=THINKING, default="auto", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=TEMPERATURE, default=None, help="[default: the model's]")
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="[default: the model's]",
)
@click.option(
    "--top-k",
    type=click.IntRange(0, 2**31 - 1),
    default=None,
    help="0 = off. [default: the model's]",
)
@click.option(
    "--seed",
    type=click.IntRange(-(2**63), 2**63 - 1),
    default=None,
    help="[default: none: each run differs]",
)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
def generate(
    model,
    device,
    dtype,
    max_seq_len,
    max_batch,
    runner,
    quantize,
    prompt,
    as_chat,
    thinking,
    max_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    stop,
):
    """Generate one reply to PROMPT and print it as it streams ("-": read it from stdin)."""
    if prompt == "-":  # (before the model loads: a pipe that fails, fails first)
        prompt = sys.stdin.read()
    engine = load_terminal_engine(model, device, dtype, max_seq_len, max_batch, runner, quantize)
    source = {"messages": [{"role": "user", "content": prompt}]} if as_chat else {"prompt": prompt}
    try:
        shown_reasoning = False
        for delta in engine.stream(
            **source,
            thinking=thinking,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=list(stop),
        ):
            if delta.reasoning:
                shown_reasoning = True
                click.echo(delta.reasoning, nl=False, err=True)
            if delta.text:
                click.echo(delta.text, nl=False)
        click.echo()
        if shown_reasoning:
            click.echo("(reasoning was printed to stderr)", err=True)
    except BrokenPipeError:
        _closed_stdout()
    except RequestError as exc:  # (its hint is the Python API's: truncate=True, ...)
        raise click.ClickException(exc.message) from exc
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.close()


if __name__ == "__main__":
    main()
