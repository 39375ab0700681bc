"""Browsers, and the headers every client sees: CORS, x-request-id, auth schemes, HEAD.

A page served from another origin calls a real ``fermi serve`` from a real headless
Chromium (Debian's ``chromium``, driven by Playwright): a streamed ``fetch`` works when the
server names the page's origin in ``--cors-origins``, and the browser refuses it when the
server does not. The same headers are checked with plain HTTP requests too.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tests.serving import free_port, http, running_server
from tests.tiny import write_checkpoint

KEY = "browser-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HI = [{"role": "user", "content": "Say hello"}]
CHAT = {"messages": HI, "max_tokens": 12, "temperature": 0, "ignore_eos": True}


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!doctype html><title>client</title><p>a page on its own origin</p>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_origin():
    """A web page's origin: another port of the loopback, so another origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("browser") / "tiny")


@pytest.fixture(scope="module")
def base(model_dir, page_origin, tmp_path_factory):
    """The server allowing the page's origin (and one more, to show a list works)."""
    log = tmp_path_factory.mktemp("browser-log") / "serve.log"
    origins = f"https://chat.example.com,{page_origin}"
    args = ["--api-key", KEY, "--cors-origins", origins, "--max-seq-len", "256"]
    with running_server(model_dir, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def closed_base(model_dir, tmp_path_factory):
    """The same model served without --cors-origins."""
    log = tmp_path_factory.mktemp("browser-log") / "closed.log"
    with running_server(model_dir, "--api-key", KEY, "--max-seq-len", "256", log=log) as url:
        yield url


def _preflight(url: str, origin: str, headers: str = "authorization, content-type"):
    asked = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }
    return http(url, headers=asked, method="OPTIONS")


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# -- CORS over plain HTTP ----------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(base, page_origin):
    status, headers, body = _preflight(base + "/v1/chat/completions", page_origin)
    h = _lower(headers)
    assert status == 204 and body == b""
    assert h["access-control-allow-origin"] == page_origin
    assert "POST" in h["access-control-allow-methods"]
    assert set(h["access-control-allow-headers"].split(", ")) == {"authorization", "content-type"}
    assert h["access-control-max-age"] == "600"
    assert "origin" in h["vary"]


def test_a_preflight_does_not_allow_headers_outside_the_list(base, page_origin):
    asked = "content-type, x-api-key, x-stainless-os, x-secret-debug"
    _, headers, _ = _preflight(base + "/v1/messages", page_origin, asked)
    allowed = set(_lower(headers)["access-control-allow-headers"].split(", "))
    assert allowed == {"content-type", "x-api-key", "x-stainless-os"}


def test_a_preflight_from_another_origin_is_403_without_cors_headers(base, closed_base):
    for url in (base, closed_base):
        status, headers, body = _preflight(url + "/v1/chat/completions", "https://evil.example")
        assert status == 403
        assert json.loads(body)["error"]["code"] == "cors_origin_not_allowed"
        assert "access-control-allow-origin" not in _lower(headers)


def test_replies_to_an_allowed_origin_carry_its_cors_headers_errors_included(base, page_origin):
    url = base + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Origin": page_origin}
    status, headers, _ = http(url, CHAT, auth)
    h = _lower(headers)
    assert status == 200 and h["access-control-allow-origin"] == page_origin
    assert "x-request-id" in h["access-control-expose-headers"]
    # A page must be able to read a 401, a 400 and a 413 (refused before the handler runs).
    status, headers, _ = http(url, CHAT, {"Origin": page_origin})
    assert status == 401 and _lower(headers)["access-control-allow-origin"] == page_origin
    status, headers, _ = http(url, b"{not json", auth)
    assert status == 400 and _lower(headers)["access-control-allow-origin"] == page_origin
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 9_000_000}]}).encode()
    status, headers, _ = http(url, big, auth)
    assert status == 413 and _lower(headers)["access-control-allow-origin"] == page_origin
    # Another origin gets no CORS headers, so its browser shows the page nothing.
    _, headers, _ = http(url, CHAT, {**auth, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in _lower(headers)


def test_a_server_without_cors_origins_sends_no_cors_headers(closed_base, page_origin):
    auth = {"Authorization": f"Bearer {KEY}", "Origin": page_origin}
    status, headers, _ = http(closed_base + "/v1/chat/completions", CHAT, auth)
    assert status == 200
    assert not any(k.startswith("access-control-") for k in _lower(headers))


def test_cors_origins_must_be_origins(model_dir, tmp_path):
    from click.testing import CliRunner

    from fermi.server.cli import serve_command

    result = CliRunner().invoke(
        serve_command,
        # (a free port: the default one may be taken, and the port is checked first)
        ["--model", str(model_dir), "--cors-origins", "http://a.example/path",
         "--port", str(free_port())],
    )  # fmt: skip
    assert result.exit_code == 2 and "not an origin" in result.output


# -- headers every client sees -----------------------------------------------------------


def test_every_reply_has_an_x_request_id_echoing_a_sane_one(base):
    url = base + "/v1/models"
    auth = {"Authorization": f"Bearer {KEY}"}
    _, headers, _ = http(url, headers={**auth, "X-Request-Id": "trace-42.a/b"})
    assert _lower(headers)["x-request-id"] == "trace-42.a/b"
    ids = {_lower(http(url, headers=auth)[1])["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith("req_") for i in ids)
    _, headers, _ = http(url, headers={**auth, "X-Request-Id": "x" * 500})
    assert _lower(headers)["x-request-id"].startswith("req_")
    status, headers, _ = http(base + "/v1/nowhere", headers=auth)
    assert status == 404 and _lower(headers)["x-request-id"].startswith("req_")


def test_a_streamed_reply_carries_the_request_id_and_cors_headers(base, page_origin):
    body = {**CHAT, "stream": True}
    sent = {"Authorization": f"Bearer {KEY}", "Origin": page_origin, "X-Request-Id": "s-1"}
    status, headers, raw = http(base + "/v1/chat/completions", body, sent)
    h = _lower(headers)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert h["x-request-id"] == "s-1" and h["access-control-allow-origin"] == page_origin


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"BEARER  {KEY} "},
        {"x-api-key": KEY},
    ],
    ids=["lower-case scheme", "upper-case scheme, spaces", "x-api-key"],
)
def test_the_key_is_taken_in_any_scheme_case_or_as_x_api_key(base, headers):
    assert http(base + "/v1/models", headers=headers)[0] == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"x-api-key": "nope"}],
    ids=["none", "no scheme", "basic", "wrong x-api-key"],
)
def test_a_missing_or_wrong_key_is_401(base, headers):
    status, _, body = http(base + "/v1/models", headers=headers)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_head_health_answers_as_get_without_a_body(base):
    status, headers, body = http(base + "/health", method="HEAD")
    assert status == 200 and body == b""
    assert _lower(headers)["content-type"] == "application/json"


def test_options_without_a_preflight_names_the_methods(base):
    status, headers, _ = http(base + "/health", method="OPTIONS")
    assert status == 204 and _lower(headers)["allow"] == "GET, OPTIONS, HEAD"
    assert "content-type" not in _lower(headers)  # no content to type
    status, headers, _ = http(base + "/v1/chat/completions", method="OPTIONS")
    assert status == 204 and _lower(headers)["allow"] == "OPTIONS, POST"
    status, headers, _ = http(base + "/v1/models/tiny", method="OPTIONS")
    assert status == 204 and _lower(headers)["allow"] == "GET, OPTIONS, HEAD"
    assert http(base + "/v1/nowhere", method="OPTIONS")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/chat/completions", "OPTIONS, POST"),
        ("GET", "/v1/completions", "OPTIONS, POST"),
        ("DELETE", "/v1/models/tiny", "GET, OPTIONS, HEAD"),
        ("POST", "/v1/models/tiny", "GET, OPTIONS, HEAD"),
        ("POST", "/health", "GET, OPTIONS, HEAD"),
    ],
)
def test_a_method_a_path_does_not_take_is_405_with_allow(base, method, path, allow):
    """RFC 9110: a 405 names the methods the path takes; a model card is read-only."""
    auth = {"Authorization": f"Bearer {KEY}"}
    status, headers, body = http(base + path, b"{}", auth, method=method)
    assert status == 405 and _lower(headers)["allow"] == allow
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_system_fingerprint_names_version_runner_and_model(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3)
    fingerprint = reply.system_fingerprint
    assert fingerprint.startswith("fermi-") and "-torch-cpu-" in fingerprint
    chunks = list(
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, stream=True)
    )
    assert {c.system_fingerprint for c in chunks} == {fingerprint}
    completion = client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert completion.system_fingerprint == fingerprint


# -- a real browser ------------------------------------------------------------------------

# Streams a chat completion with fetch and reads the body as it arrives; returns the
# content joined from the SSE chunks, how many reads it took, and the request id header.
STREAM_JS = """
async ([url, key, body]) => {
  try {
    const reply = await fetch(url, {
      method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let raw = "", reads = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      reads += 1;
      raw += decoder.decode(value, {stream: true});
    }
    let text = "";
    for (const line of raw.split("\\n")) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      for (const choice of JSON.parse(line.slice(6)).choices) text += choice.delta.content || "";
    }
    return {status: reply.status, text, reads, done: raw.endsWith("data: [DONE]\\n\\n"),
            requestId: reply.headers.get("x-request-id")};
  } catch (error) {
    return {error: String(error)};
  }
}
"""


@pytest.fixture(scope="module")
def browser_page(page_origin):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(page_origin + "/")
            yield page
        finally:
            browser.close()


def test_a_page_on_an_allowed_origin_streams_a_chat_with_fetch(browser_page, base):
    body = {**CHAT, "stream": True}
    got = browser_page.evaluate(STREAM_JS, [base + "/v1/chat/completions", KEY, body])
    assert "error" not in got, got
    assert got["status"] == 200 and got["done"] and got["requestId"].startswith("req_")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    settings = {k: v for k, v in CHAT.items() if k != "ignore_eos"}
    whole = client.chat.completions.create(
        model="tiny", **settings, extra_body={"ignore_eos": True}
    )
    assert got["text"] == whole.choices[0].message.content and got["text"]


def test_the_browser_refuses_the_same_fetch_without_cors_origins(browser_page, closed_base):
    body = {**CHAT, "stream": True}
    got = browser_page.evaluate(STREAM_JS, [closed_base + "/v1/chat/completions", KEY, body])
    assert got == {"error": "TypeError: Failed to fetch"}


def test_a_refused_preflight_on_the_anthropic_api_speaks_its_shape(base):
    status, _, body = _preflight(base + "/v1/messages", "https://evil.example")
    error = json.loads(body)
    assert status == 403 and error["type"] == "error"
    assert error["error"]["type"] == "permission_error"
    assert "add it to --cors-origins" in error["error"]["message"]
