"""Second-turn time to first token over gRPC: a Chat session (KV cache reused) vs
resending the whole conversation to Generate (full prefill), on the same model and server.

    .venv/bin/python perf/bench_grpc_session.py [--history-tokens 1200] [--repeats 5]

The model is a random-weight Qwen3 shape (tests/tiny.py's tokenizer and chat template),
big enough that prefill cost shows on CPU. Results go to perf/results/grpc_session.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fermi  # noqa: E402
from fermi.rpc.generated import fermi_pb2 as pb  # noqa: E402
from fermi.rpc.generated import fermi_pb2_grpc as pb_grpc  # noqa: E402
from fermi.rpc.server import ServerThread  # noqa: E402
from fermi.rpc.sessions import SessionConfig  # noqa: E402
from tests.tiny import write_checkpoint  # noqa: E402

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
}
SYSTEM = "You are a helpful assistant. Answer the user's question clearly."
FILLER = "The capital of France is Paris. The capital of Japan is Tokyo. "
SECOND_TURN = "Thank you. And the capital of Japan?"
FIRST_REPLY_TOKENS = 16


def first_token_seconds(responses) -> tuple[float, pb.GenerateResponse]:
    """Seconds from the call until its first streamed response; drains the rest."""
    start = time.perf_counter()
    first = None
    last = None
    for response in responses:
        if first is None:
            first = time.perf_counter() - start
        last = response
    assert first is not None and last is not None
    return first, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history-tokens", type=int, default=1200, help="first user turn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/grpc_session.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "qwen3-bench", SHAPE, seed=0)
        engine = fermi.load(folder, max_batch=2, max_seq_len=4096, prefill_chunk=512)
    params = sum(p.numel() for p in engine.runner.model.parameters())
    tokens_per_filler = len(engine.tokenizer.encode(FILLER, add_special_tokens=False))
    first_user = FILLER * max(1, args.history_tokens // tokens_per_filler)
    sampling = pb.SamplingParams(max_tokens=FIRST_REPLY_TOKENS, temperature=0, ignore_eos=True)
    second = pb.SamplingParams(max_tokens=1, temperature=0)

    session_ttft, resend_ttft = [], []
    with ServerThread(engine, SessionConfig()) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.FermiStub(channel)
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            first = list(
                stub.Chat(
                    pb.ChatRequest(
                        message=pb.Message(content=first_user), system=SYSTEM, sampling=sampling
                    )
                )
            )
            session_id = first[-1].session_id
            reply = "".join(r.text for r in first)
            t_session, last_session = first_token_seconds(
                stub.Chat(
                    pb.ChatRequest(
                        session_id=session_id,
                        message=pb.Message(content=SECOND_TURN),
                        sampling=second,
                    )
                )
            )
            stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
            history = [
                pb.Message(role="system", content=SYSTEM),
                pb.Message(role="user", content=first_user),
                pb.Message(role="assistant", content=reply),
                pb.Message(role="user", content=SECOND_TURN),
            ]
            t_resend, last_resend = first_token_seconds(
                stub.Generate(
                    pb.GenerateRequest(
                        conversation=pb.Conversation(messages=history), sampling=second
                    )
                )
            )
            assert last_resend.usage.prompt_tokens == last_session.usage.prompt_tokens
            session_ttft.append(t_session)
            resend_ttft.append(t_resend)
        channel.close()
    engine.close()

    usage = last_session.usage
    result = {
        "benchmark": "grpc second-turn time to first token",
        "model": {"random_weights": True, "parameters": params, **SHAPE, "dtype": "float32"},
        "runner": engine.capabilities.name,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "second_turn_prompt_tokens": usage.prompt_tokens,
        "second_turn_cached_tokens": usage.cached_tokens,
        "repeats": args.repeats,
        "session_reuse_ttft_ms": _summary(session_ttft[1:]),
        "resend_history_ttft_ms": _summary(resend_ttft[1:]),
        "speedup_median": statistics.median(resend_ttft[1:]) / statistics.median(session_ttft[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model: random Qwen3 shape, {params / 1e6:.1f}M params, {result['runner']}")
    print(f"second turn: {usage.prompt_tokens} prompt tokens, {usage.cached_tokens} from cache")
    print(f"{'path':<24}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for name, key in (
        ("Chat session (reuse)", "session_reuse_ttft_ms"),
        ("Generate (resend)", "resend_history_ttft_ms"),
    ):
        s = result[key]
        print(f"{name:<24}{s['median']:>12.1f}{s['min']:>10.1f}{s['max']:>10.1f}")
    print(f"speedup (median): {result['speedup_median']:.1f}x -> {args.out}")


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "median": round(statistics.median(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


if __name__ == "__main__":
    main()
