"""How long /health waits while a hostile body is decoded and refused (issue 18).

In process, on the tiny random model of the unit tests (two replicas, CPU): each hostile
body is sent to ``Api.handle`` while /health is probed every 10 ms; the figure is the
longest gap between two /health answers, the worst of three tries.

    .venv/bin/python perf/health_hostile_bodies.py --out perf/results/cpu_health_hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bodies() -> dict[str, tuple[str, bytes]]:
    from tests.test_server_units import HOSTILE

    out = {kind: (path, json.dumps(body).encode()) for kind, (path, body, _) in HOSTILE.items()}
    chat = "/v1/chat/completions"
    message = b'{"role":"user","content":"a"}'
    out["JSON nested 1M deep"] = (chat, b'{"messages":' + b"[" * 10**6 + b"]" * 10**6 + b"}")
    escapes = b"\\u00e9" * 1_300_000
    out["7.8 MB of \\u escapes"] = (
        chat,
        b'{"messages":[{"role":"user","content":"' + escapes + b'"}],"max_tokens":1}',
    )
    out["250k small Anthropic messages"] = (
        "/v1/messages",
        b'{"model":"MODEL","max_tokens":1,"messages":[' + b",".join([message] * 250_000) + b"]}",
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help="run the bodies whose name contains this")
    args = p.parse_args()

    from fermi.heap import settle
    from fermi.server.config import ServerConfig
    from fermi.server.handlers import Api
    from fermi.server.pool import load_pool
    from tests.serving import thinking_checkpoint
    from tests.test_server_units import probe_while

    folder = thinking_checkpoint(Path(tempfile.mkdtemp()) / "tiny", max_positions=256)
    pool = load_pool(str(folder), [None, None], max_seq_len=256, max_batch=4, prefix_reuse=False)
    api = Api(pool, ServerConfig(model=str(folder), prefix_reuse=False))
    settle()  # as fermi serve does once its model is loaded
    rows = []
    try:
        for kind, (path, raw) in bodies().items():
            raw = raw.replace(b'"MODEL"', msgspec.json.encode(api.model_name))
            if args.only and args.only not in kind:
                continue

            async def once(path=path, raw=raw):
                await api.handle("GET", "/health", {}, b"")
                hostile = asyncio.ensure_future(api.handle("POST", path, {}, raw))
                gap = await probe_while(api, hostile)
                return gap, hostile.result().status

            tries = [asyncio.run(once()) for _ in range(args.tries)]
            worst = max(gap for gap, _ in tries)
            row = {"body": kind, "mb": round(len(raw) / 1e6, 1), "status": tries[0][1]}
            row["longest_health_gap_ms"] = round(worst * 1000, 1)
            rows.append(row)
            print(f"{kind:28s} {row['mb']:5.1f} MB  {row['status']}  {worst * 1000:.0f} ms")
    finally:
        api.close()
    if args.out:
        result = {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
