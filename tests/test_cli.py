"""The chat and generate commands driven as a user would, through real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.tiny import write_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "qwen3", {})


def fermi(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )


def replies(stdout: str) -> list[str]:
    """The reply texts of a chat session's output, without header and stats lines."""
    body = stdout.split("\n", 1)[1].replace("(conversation cleared)\n", "")
    return re.split(r"\n\[\d+ tokens[^\]]*\]\n", body)[:-1]


def test_chat_two_turns_reset_and_exit(folder):
    script = "hello there\nand again\n/reset\nfresh start\n/exit\nnever read\n"
    args = ["--model", str(folder), "--max-tokens", "6", "--temperature", "0"]
    res = fermi("chat", *args, stdin=script)
    assert res.returncode == 0, res.stderr
    assert "(conversation cleared)" in res.stdout
    got = replies(res.stdout)
    assert len(got) == 3  # the line after /exit is never read

    import fermi as api

    u1, u2, u3 = (
        {"role": "user", "content": c} for c in ("hello there", "and again", "fresh start")
    )
    with api.load(folder, max_batch=1, max_seq_len=512) as engine:

        def say(msgs):
            return engine.generate(messages=msgs, max_tokens=6, temperature=0).text

        a1 = say([u1])
        a2 = say([u1, {"role": "assistant", "content": a1}, u2])  # the history is kept
        a3 = say([u3])  # after /reset the conversation starts afresh
    assert got == [a1, a2, a3]
    assert a2 != say_alone(folder, u2)


def say_alone(folder, message):
    import fermi as api

    with api.load(folder, max_batch=1, max_seq_len=512) as engine:
        return engine.generate(messages=[message], max_tokens=6, temperature=0).text


def test_chat_ends_on_eof(folder):
    res = fermi(
        "chat", "--model", str(folder), "--max-tokens", "3", "--temperature", "0", stdin="hi\n"
    )
    assert res.returncode == 0
    assert "[3 tokens" in res.stdout


def test_generate_prints_the_completion(folder):
    import fermi as api

    with api.load(folder, max_batch=1, max_seq_len=512) as engine:
        expected = engine.generate(prompt="Once upon", max_tokens=8, temperature=0).text
    res = fermi(
        "generate",
        "--model",
        str(folder),
        "--raw",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "Once upon",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_bad_model_is_a_clear_error_not_a_traceback(tmp_path):
    res = fermi("generate", "--model", str(tmp_path), "hi")
    assert res.returncode != 0
    assert "has no config.json" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("grpc", "--port", "99999"), "--port"),  # (was: served on 99999 - 65536)
        (("grpc", "--port", "-1"), "--port"),
        (("serve", "--port", "70000"), "--port"),  # (was: an OverflowError traceback)
        (("serve", "--max-batch", "-3"), "--max-batch"),  # (was: a worker's traceback)
        (("generate", "--max-batch", "0", "hi"), "--max-batch"),  # (was: ran, as 8)
        (("generate", "--max-seq-len", "1", "hi"), "--max-seq-len"),
    ],
)
def test_out_of_range_numbers_are_refused_before_the_model_loads(tmp_path, args, named):
    """The model path does not exist: a refusal that names the option comes first."""
    res = fermi(*args[:1], "--model", str(tmp_path / "nowhere"), *args[1:])
    assert res.returncode == 2, res.stderr
    assert named in res.stderr and "is not in the range" in res.stderr
    assert "Traceback" not in res.stderr


def test_model_defaults_to_fermi_model_env_and_help_shows_defaults():
    res = fermi("chat", "--help", env={"FERMI_MODEL": "acme/custom"})
    assert res.returncode == 0
    assert "FERMI_MODEL" in res.stdout and "Qwen/Qwen3-1.7B" in res.stdout
    assert "--thinking" in res.stdout


def test_chat_drops_the_oldest_turns_when_the_context_fills(folder):
    words = "the quick brown fox jumps over the lazy dog " * 3
    turns = [f"{i} {words}" for i in range(6)]
    script = "\n".join(turns) + "\n"
    args = ["--model", str(folder), "--max-tokens", "8", "--temperature", "0"]
    res = fermi("chat", *args, "--max-seq-len", "160", "--system", "be brief", stdin=script)
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr
    assert "(context full: dropped the" in res.stdout
    body = re.sub(r"\(context full: dropped the \d+ oldest messages\)\n", "", res.stdout)
    assert len(replies(body)) == len(turns)  # every question got its reply

    # Alone, a question longer than the context is still a clear error, and the session goes on.
    long = "word " * 400
    res = fermi("chat", *args, "--max-seq-len", "160", stdin=f"{long}\nhi\n")
    assert res.returncode == 0
    assert "error:" in res.stderr and "context" in res.stderr
    assert "truncate" not in res.stderr  # the Python API's hint: the CLI has no such option
    assert "[" in res.stdout.split("\n", 1)[1]  # the next turn answered


def test_chat_allocates_one_cache_slot_unless_told(folder, monkeypatch):
    from click.testing import CliRunner

    import fermi as api
    from fermi import cli

    seen = []
    real = api.load

    def load(*args, **kwargs):  # the real loader; only notes what it was asked for
        engine = real(*args, **kwargs)
        seen.append(engine.capabilities.max_batch)
        return engine

    monkeypatch.setattr(api, "load", load)
    args = ["chat", "--model", str(folder), "--max-tokens", "2", "--temperature", "0"]
    for extra, want in (([], 1), (["--max-batch", "3"], 3)):
        res = CliRunner().invoke(cli.main, [*args, *extra], input="hi\n/exit\n")
        assert res.exit_code == 0, res.output
        assert seen[-1] == want


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["chat", "--max-tokens", "0"], "--max-tokens"),
        (["chat", "--temperature", "-1"], "--temperature"),
        (["generate", "x", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "x", "--temperature", "101"], "--temperature"),
        (["generate", "x", "--top-p", "0"], "--top-p"),
        (["generate", "x", "--top-k", "-1"], "--top-k"),
        (["generate", "x", "--top-k", str(2**31)], "--top-k"),
        (["generate", "x", "--seed", str(2**63)], "--seed"),
    ],
)
def test_sampling_options_out_of_range_are_usage_errors_before_the_model_loads(args, named):
    """Refused by the option's type (exit 2, naming it), not by the engine on every turn
    after the model has loaded (the model named here does not exist)."""
    from click.testing import CliRunner

    from fermi import cli
    from fermi.sampling import MAX_TEMPERATURE

    assert cli.TEMPERATURE.max == MAX_TEMPERATURE
    res = CliRunner().invoke(cli.main, [*args, "-m", "/nonexistent"], input="hi\n")
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{named}'" in res.output


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(folder):
    """SIGINT while a reply streams cancels that reply (its tokens so far kept in the
    conversation) and the next question is answered; it no longer ends the session."""
    import signal
    import time

    args = ["--model", str(folder), "--max-seq-len", "4096", "--temperature", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fermi.cli", "chat", *args, "--max-tokens", "3000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        proc.stdin.write("hi\n")
        proc.stdin.flush()
        banner = proc.stdout.readline()
        assert banner.startswith("fermi chat"), banner
        proc.stdout.read(1)  # the reply has started streaming
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("again\n/exit\n", timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stops = re.findall(r"\[(\d+) tokens · [\d.]+ tok/s · ([a-z -C]+)\]", out)
    assert [reason for _, reason in stops] == ["stopped by Ctrl-C", "length"], out[-500:]
    assert 0 < int(stops[0][0]) < 3000 and int(stops[1][0]) == 3000


def test_chat_refuses_a_template_it_cannot_use_in_one_line_before_the_chat(tmp_path):
    """No chat template, or one that refuses a system message (Gemma 2's, Mistral's): one
    Error line before the chat (a traceback came up to the terminal)."""
    import json

    plain = write_checkpoint(tmp_path / "plain", {}, template="plain")
    res = fermi("chat", "--model", str(plain), stdin="hi\n")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("Error: this tokenizer has no chat template")

    strict = write_checkpoint(tmp_path / "strict", {})
    config_file = strict / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    config_file.write_text(json.dumps(config))
    res = fermi("chat", "--model", str(strict), "--system", "Be brief", stdin="hi\n")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "Invalid value for --system" in res.stderr and "System role not supported" in res.stderr
    res = fermi("chat", "--model", str(strict), "--max-tokens", "2", stdin="hi\n")
    assert res.returncode == 0, res.stderr  # without the system message it chats


def test_a_system_message_the_context_cannot_hold_is_refused_before_the_chat(folder):
    system = "word " * 300
    args = ["--model", str(folder), "--max-seq-len", "128", "--system", system]
    res = fermi("chat", *args, stdin="hi\n")
    assert res.returncode == 2, res.stderr
    assert "Invalid value for --system" in res.stderr and "of this engine's context of 128" in (
        res.stderr
    )


def test_a_question_that_can_never_fit_leaves_the_conversation_as_it_was(folder, monkeypatch):
    """The oldest exchanges were dropped to make room for it, and then it was refused
    anyway: the conversation had lost them for nothing."""
    from click.testing import CliRunner

    from fermi import cli

    seen = []
    real = cli._stream_reply

    def spy(engine, history, *args):
        seen.append([m["content"][:12] for m in history])
        return real(engine, history, *args)

    monkeypatch.setattr(cli, "_stream_reply", spy)
    args = ["chat", "--model", str(folder), "--max-tokens", "4", "--temperature", "0"]
    script = f"my name is Zed\n{'word ' * 400}\nwhat is my name\n"
    res = CliRunner().invoke(cli.main, [*args, "--max-seq-len", "160"], input=script)
    assert res.exit_code == 0, res.output
    assert "context full" not in res.output
    assert seen[0] == ["my name is Z"]
    assert seen[-1][0] == "my name is Z" and seen[-1][-1] == "what is my n"


def test_a_reader_that_goes_away_ends_the_output_quietly(folder):
    """`fermi chat ... | head -1`: each later write met EPIPE and printed 'error: [Errno 32]
    Broken pipe' for every turn, exiting 0; now the program stops as SIGPIPE would."""
    script = "hi\n" * 40
    args = ["--model", str(folder), "--max-tokens", "8", "--temperature", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fermi.cli", "chat", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert proc.stdout.readline().startswith(b"fermi chat")
        proc.stdout.close()  # the reader leaves after the banner
        _, err = proc.communicate(script.encode(), timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 141, err
    assert b"Broken pipe" not in err and b"Traceback" not in err


def test_ctrl_c_at_the_prompt_quits_the_chat_with_status_0(folder):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "fermi.cli", "chat", "--model", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
    )
    try:
        assert proc.stdout.readline().startswith("fermi chat")
        time.sleep(0.5)  # waiting for a question
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Aborted" not in err and "Traceback" not in err


def test_generate_reads_a_prompt_of_dash_from_stdin(folder):
    args = ["generate", "--model", str(folder), "--raw", "--max-tokens", "4", "--temperature", "0"]
    piped = fermi(*args, "-", stdin="the quick brown fox")
    given = fermi(*args, "the quick brown fox")
    assert piped.returncode == 0 and given.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout
