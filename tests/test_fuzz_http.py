"""Fuzz the HTTP API of a real ``fermi serve``: bodies drawn from the server's own
``/openapi.json``, valid ones and ones with random types, random nesting and random bytes
in any field. No answer may be a 5xx (nor a stream's error event), every 4xx has OpenAI's
error shape (Anthropic's on ``/v1/messages*``), and the server stays healthy.

Strategies are built here from the description's schemas (the handful of JSON Schema
keywords it uses) rather than with hypothesis-jsonschema, which only draws valid instances:
most of the interest is in the invalid ones, and the builder is a few lines.
"""

from __future__ import annotations

import collections
import json
import re
import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fermi.server.anthropic_protocol import speaks_anthropic
from tests.serving import http, running_server, thinking_checkpoint

# A short context bounds every generation the fuzzer asks for (max_tokens included).
SEQ_LEN = 64

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = thinking_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", max_positions=256)
    log = tmp_path_factory.mktemp("fuzz-log") / "serve.log"
    # At most 4 choices at once (2 slots, 2 waiting): prompts x n beyond that is a 400.
    args = ["--max-seq-len", str(SEQ_LEN), "--max-batch", "2", "--max-waiting", "2"]
    args += ["--max-body-bytes", "65536"]
    with running_server(folder, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def openapi(base) -> dict:
    status, headers, body = http(base + "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    description = json.loads(body)
    # Valid bodies name the served model, or none, more often than a random string would.
    served = json.loads(http(base + "/v1/models")[2])["data"][0]["id"]
    schemas = description["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
        schemas[name]["properties"]["model"]["anyOf"].insert(0, {"enum": [served]})
    for name in ("MessagesRequest", "CountTokensRequest"):  # (a required string there)
        schemas[name]["properties"]["model"] = {"anyOf": [{"enum": [served]}, {"type": "string"}]}
    return description


def from_schema(schema: dict, components: dict, junk: bool) -> st.SearchStrategy:
    """Instances of ``schema``; with ``junk``, any value at any depth may be replaced by
    random JSON of another type."""
    valid = _valid(schema, components, junk)
    return st.one_of(valid, ANY_JSON) if junk else valid


def _valid(schema: dict, components: dict, junk: bool) -> st.SearchStrategy:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(components[name], components, junk))
    if "anyOf" in schema:
        return st.one_of(*(from_schema(s, components, junk) for s in schema["anyOf"]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMaximum" in schema:
            high = schema["exclusiveMaximum"] - 1
        # Small values (token ids within the vocabulary, short max_tokens) more often.
        small = low or 0  # (and small values often, up to 300 past the minimum)
        return st.integers(low, high) | st.integers(small, min(high or small + 300, small + 300))
    if kind == "number":
        return st.floats(
            schema.get("minimum", schema.get("exclusiveMinimum")),
            schema.get("maximum"),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 40))
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, junk)
        size = min(schema.get("maxItems", 4), 4)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=size)
    if kind == "object" and "properties" in schema:
        props = {k: from_schema(v, components, junk) for k, v in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    return ANY_JSON


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn about in proportion to its weight (``one_of``
    alone draws by its own rules, which flattening nested choices makes lopsided)."""
    picks = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda strategy: strategy)


def bodies(openapi: dict, path: str) -> st.SearchStrategy[bytes]:
    components = openapi["components"]["schemas"]
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    schema = schema["schema"]
    as_json = st.one_of(
        from_schema(schema, components, junk=False),
        from_schema(schema, components, junk=True),
    ).map(lambda body: json.dumps(body).encode())
    # Bytes that are not JSON, or JSON nested deeper than the decoder goes.
    deep = st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n)
    cut = as_json.flatmap(lambda raw: st.integers(0, len(raw)).map(lambda i: raw[:i]))
    return weighted((6, as_json), (1, st.binary(max_size=64)), (1, deep), (1, cut))


def requests(openapi: dict) -> st.SearchStrategy[tuple[str, str, bytes | None]]:
    posts = [p for p, ops in openapi["paths"].items() if "post" in ops]
    generation = st.one_of(*(bodies(openapi, p).map(lambda b, p=p: ("POST", p, b)) for p in posts))
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE"])
    # Characters a request path may hold (RFC 3986): Granian's HTTP parser answers any
    # other with a bare 400 before the app sees the request.
    path_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/"
    paths = st.sampled_from(list(openapi["paths"])) | st.text(path_chars, max_size=20).map(
        lambda p: "/" + p
    )
    other = st.tuples(methods, paths, st.none() | st.binary(max_size=32))
    return weighted((4, generation), (1, other))


def check_reply(method: str, path: str, status: int, headers: dict, body: bytes) -> None:
    if speaks_anthropic(path):
        check_anthropic_reply(status, headers, body)
        return
    assert status < 500, (status, body[:500])
    content_type = headers.get("content-type", "")
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "rate_limit_error")
    elif content_type.startswith("text/event-stream") and path == "/v1/responses":
        # Named events, numbered in order, ending with the whole response; no [DONE].
        events = [event.split("\n") for event in body.decode().strip().split("\n\n")]
        kinds = [name.removeprefix("event: ") for name, _ in events]
        datas = [json.loads(data.removeprefix("data: ")) for _, data in events]
        assert [d["type"] for d in datas] == kinds
        assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
        assert kinds[0] == "response.created"
        assert kinds[-1] in ("response.completed", "response.incomplete"), kinds[-1]
    elif content_type.startswith("text/event-stream"):
        events = body.decode().strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event.removeprefix("data: ")), event
    elif path != "/metrics":
        json.loads(body)


def check_anthropic_reply(status: int, headers: dict, body: bytes) -> None:
    """Anthropic's shapes: its error body, its named events (529: the engine was full)."""
    assert status < 500 or status == 529, (status, body[:500])
    if status >= 400:
        reply = json.loads(body)
        assert reply["type"] == "error" and set(reply["error"]) == {"type", "message"}
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
        kinds = (
            "invalid_request_error",
            "not_found_error",
            "request_too_large",
            "overloaded_error",
        )
        assert reply["error"]["type"] in kinds, reply
    elif headers.get("content-type", "").startswith("text/event-stream"):
        events = body.decode().strip().split("\n\n")
        assert events[0].startswith("event: message_start\n")
        assert events[-1].startswith("event: message_stop\n")
        for event in events:
            name, data = event.split("\n")
            assert name.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
            assert name != "event: error", event
    else:
        json.loads(body)


def test_fuzzed_requests_get_no_5xx_and_errors_in_openais_shape(base, openapi):
    started = time.monotonic()
    statuses = collections.Counter()

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(openapi))
    def fuzz(request):
        method, path, body = request
        if method == "GET":
            body = None
        status, headers, raw = http(base + path, body, method=method)
        check_reply(method, path, status, headers, raw)
        statuses[status] += 1

    fuzz()
    # Both ends were reached: generations ran, and refusals came back.
    assert statuses[200] and statuses[400], statuses
    status, _, _ = http(base + "/health")
    assert status == 200
    metrics = http(base + "/metrics")[2].decode()
    counted = re.findall(r'^fermi:http_errors_total\{[^}]*status="(\d+)"', metrics, re.M)
    assert counted and not [status for status in counted if status.startswith("5")]
    assert time.monotonic() - started < 120  # the whole fuzz, on a loaded 2-core machine
