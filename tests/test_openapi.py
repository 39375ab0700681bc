"""The served OpenAPI description stays true to the request Structs of ``protocol.py``."""

from __future__ import annotations

import msgspec
import pytest

from fermi.server.anthropic_protocol import (
    AnthropicMessage,
    AnthropicTool,
    CountTokensRequest,
    MessagesRequest,
)
from fermi.server.openapi import OPENAPI, OPENAPI_JSON
from fermi.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Message,
)
from fermi.server.responses_protocol import ResponsesInputItem, ResponsesRequest

SCHEMAS = OPENAPI["components"]["schemas"]
# What msgspec itself accepts, component by component (every Struct a request body holds).
REQUESTS = (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    MessagesRequest,
    CountTokensRequest,
    ResponsesRequest,
    # The items of the lists the first decode keeps raw (decoded one by one in the worker).
    Message,
    AnthropicMessage,
    AnthropicTool,
    ResponsesInputItem,
)
STRUCT_SCHEMAS = msgspec.json.schema_components(REQUESTS)[1]


def json_types(schema: dict, components: dict) -> set[str]:
    """The JSON types a schema admits at its top level ("any" for an open schema)."""
    if "$ref" in schema:
        return json_types(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        return set().union(*(json_types(s, components) for s in schema["anyOf"]))
    if "enum" in schema:
        names = {str: "string", int: "integer", float: "number", bool: "boolean"}
        return {names[type(v)] for v in schema["enum"]}
    if "type" in schema:
        return {schema["type"]}
    return {"any"}


@pytest.mark.parametrize("name", sorted(STRUCT_SCHEMAS))
def test_every_request_field_is_described_with_the_types_msgspec_accepts(name):
    ours, theirs = SCHEMAS[name], STRUCT_SCHEMAS[name]
    assert set(ours["properties"]) == set(theirs["properties"])
    assert set(ours.get("required", ())) == set(theirs.get("required", ()))
    for field, schema in theirs["properties"].items():
        expected = json_types(schema, STRUCT_SCHEMAS)
        assert json_types(ours["properties"][field], SCHEMAS) == expected, field


def test_the_bounds_in_the_description_are_the_servers():
    chat = SCHEMAS["ChatCompletionRequest"]["properties"]
    stop_list = chat["stop"]["anyOf"][1]
    assert (stop_list["maxItems"], stop_list["items"]["maxLength"]) == (16, 256)
    assert chat["n"]["anyOf"][0]["maximum"] == 16  # (null: unset)
    assert SCHEMAS["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["maxItems"] == 64
    assert SCHEMAS["EmbeddingRequest"]["properties"]["input"]["anyOf"][1]["maxItems"] == 2048
    roles = SCHEMAS["Message"]["properties"]["role"]["enum"]
    assert roles == ["system", "developer", "user", "assistant", "tool"]


def test_the_served_bytes_are_the_description():
    assert msgspec.json.decode(OPENAPI_JSON) == OPENAPI
    assert set(OPENAPI["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/models",
        "/health",
        "/metrics",
        "/openapi.json",
    }
