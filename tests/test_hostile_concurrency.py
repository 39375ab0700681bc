"""Hostile requests in flight do not slow a normal request or /health (issue 18).

Against a real ``fermi serve`` on the tiny model (CPU). For each hostile kind, within one
run: a normal streamed chat request alone (baseline), then the same request while hostile
requests of that kind are sent back to back (one always in flight), with /health polled
meanwhile. The bounds are ratios against the baseline of the same run, plus a small
absolute slack for a shared 2-core machine, never bare wall-clock figures:

- mean gap between the normal stream's chunks <= 3 x baseline + 50 ms (what stop matching
  or long generation on the engine thread would break);
- its time to first chunk <= 3 x baseline + 200 ms (the slack covers one multi-MB JSON
  decode, which still runs on the event loop: about 0.1 s);
- /health p95 < 0.5 s, and its slowest answer < 1 s, while the hostile one is in flight.

Checked by hand (not committed): with a 0.5 s ``time.sleep`` on the event loop for every
hostile body and request building moved back onto the loop, every kind failed here (first
chunk 355-387 ms against at most 259 ms allowed; /health p95 0.49-0.52 s and slowest 1.0 s
for the kinds refused back to back). Without it, on 2 cores: gaps 3-24 ms (alone 2-4 ms),
first chunk 3-24 ms, /health p95 3-19 ms.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.serving import running_server, thinking_checkpoint

MAX_SEQ_LEN = 1024
BIG = 6_600_000  # characters: the 6.6 MB chat message that froze /health for 12.5 s


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE: dict[str, tuple[str, bytes, set[int]]] = {
    "64 prompts": (  # the most prompts one completions request takes, each long
        "/v1/completions",
        json.dumps({"prompt": ["The quick brown fox. " * 20] * 64, "max_tokens": 1}).encode(),
        {200},
    ),
    "16 stops of 256 chars": (  # the stop list at its bound, matched on every token
        "/v1/chat/completions",
        json.dumps(
            {
                "messages": [{"role": "user", "content": "hello"}],
                "stop": [chr(ord("a") + i) * 255 + "z" for i in range(16)],
                "max_tokens": 200,
                "ignore_eos": True,
                "thinking": "off",
            }
        ).encode(),
        {200},
    ),
    "JSON nested 1M deep": ("/v1/chat/completions", nested(1_000_000), {400}),
    "6.6 MB chat message": (
        "/v1/chat/completions",
        json.dumps(
            {"messages": [{"role": "user", "content": "The quick brown fox. " * (BIG // 21)}]}
        ).encode(),
        {400},
    ),
    "6.6 MB of control-token text": (  # every "<|im_end|>" a match to keep as text
        "/v1/chat/completions",
        json.dumps(
            {"messages": [{"role": "user", "content": "<|im_end|>" * (BIG // 10)}]}
        ).encode(),
        {400},
    ),
    "max_tokens to the end of the context": (
        "/v1/chat/completions",
        json.dumps(
            {
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": MAX_SEQ_LEN - 32,
                "ignore_eos": True,
                "thinking": "off",
            }
        ).encode(),
        {200},
    ),
}

NORMAL = json.dumps(
    {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
        "thinking": "off",
    }
).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    model = thinking_checkpoint(folder / "tiny", max_positions=MAX_SEQ_LEN)
    args = ("--max-seq-len", str(MAX_SEQ_LEN), "--max-batch", "80")
    with running_server(model, *args, log=folder / "serve.log") as url:
        yield url


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)


def post(url: str, path: str, body: bytes) -> int:
    conn = connect(url)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def normal_stream(url: str) -> tuple[float, float]:
    """(time to first chunk, mean gap between chunks) of the normal streamed request."""
    conn = connect(url)
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", NORMAL, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        arrivals = []
        for line in resp:
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter())
        assert len(arrivals) >= 20, len(arrivals)
    finally:
        conn.close()
    ttft = arrivals[0] - started
    return ttft, (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)


class Background(threading.Thread):
    """Runs ``step`` over and over until stopped, recording what each call returned and
    when it started and ended."""

    def __init__(self, step, pause: float = 0.0):
        super().__init__(daemon=True)
        self.step, self.pause = step, pause
        self.stop = threading.Event()
        self.calls: list[tuple[float, float, object]] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stop.is_set():
                began = time.perf_counter()
                result = self.step()
                self.calls.append((began, time.perf_counter(), result))
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, self.error


def health(url: str) -> int:
    conn = connect(url)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_normal_request_and_health_keep_pace_beside_a_hostile_request(server, kind):
    path, body, statuses = HOSTILE[kind]
    normal_stream(server)  # warm: first-request costs are not the baseline's
    base_ttft, base_gap = normal_stream(server)

    hostile = Background(lambda: post(server, path, body))
    hostile.start()
    time.sleep(0.15)  # the first hostile request is uploaded and being handled
    probe = Background(lambda: health(server), pause=0.02)
    probe.start()
    try:
        window = time.perf_counter()
        ttft, gap = normal_stream(server)
        window_end = time.perf_counter()
        time.sleep(0.1)  # /health answers a little past the normal request too
    finally:
        probe.finish()
        hostile.finish()

    # A hostile request was in flight through the whole normal request (back to back).
    assert hostile.calls and hostile.calls[0][0] < window
    assert hostile.calls[-1][1] > window_end
    assert {status for _, _, status in hostile.calls} <= statuses, hostile.calls
    health_times = sorted(end - began for began, end, _ in probe.calls)
    assert health_times and all(status == 200 for _, _, status in probe.calls)
    p95 = health_times[int(0.95 * (len(health_times) - 1))]
    report = (
        f"{kind}: {len(hostile.calls)} hostile requests; gap {gap * 1e3:.1f} ms "
        f"(alone {base_gap * 1e3:.1f}), first chunk {ttft * 1e3:.0f} ms "
        f"(alone {base_ttft * 1e3:.0f}), /health p95 {p95 * 1e3:.0f} ms "
        f"max {health_times[-1] * 1e3:.0f} ms over {len(health_times)}"
    )
    print(report)
    assert gap <= 3 * base_gap + 0.05, report
    assert ttft <= 3 * base_ttft + 0.2, report
    assert p95 < 0.5, report
    assert health_times[-1] < 1.0, report
