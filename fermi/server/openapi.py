"""The OpenAPI 3.1 description the server serves at ``GET /openapi.json``.

Written out by hand so that it says what the endpoints accept on the wire (a field that
takes a string or a list says so), and kept to ``protocol.py`` by a test: every field of
the request Structs appears here, with the same required fields. Clients and fuzzers
(``tests/test_fuzz_http.py``) read it; the server does not validate against it (msgspec
does, from the Structs).
"""

from __future__ import annotations

from typing import Any

import msgspec

from fermi.engine.embeddings import MAX_INPUTS
from fermi.engine.requests import ROLES
from fermi.sampling import MAX_TEMPERATURE
from fermi.server.anthropic_protocol import EFFORT_THINKING as ANTHROPIC_EFFORT
from fermi.server.anthropic_protocol import MESSAGES_UNSUPPORTED, MIN_BUDGET_TOKENS
from fermi.server.build import (
    CHAT_UNSUPPORTED,
    EFFORT_THINKING,
    MAX_CHOICES,
    MAX_PROMPTS,
    SAMPLING_UNSUPPORTED,
)
from fermi.server.responses_build import INCLUDABLE
from fermi.text.stops import MAX_STOP_CHARS, MAX_STOPS


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
# An OpenAI field for a feature this server does not have: given, it is a 400 naming it.
_UNSUPPORTED = {"description": "not supported: a request that sets it is refused (400)"}
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_OBJECT = {"type": "object"}
_REF = "#/components/schemas/"

_SAMPLING_FIELDS: dict[str, Any] = {
    "model": _nullable(_STRING),
    "max_tokens": _nullable({**_INT, "minimum": 1}),
    "temperature": _nullable({**_NUMBER, "minimum": 0, "maximum": MAX_TEMPERATURE}),
    "top_p": _nullable({**_NUMBER, "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _nullable({**_INT, "minimum": 0, "exclusiveMaximum": 2**31, "description": "0 = off"}),
    "min_p": _nullable({**_NUMBER, "minimum": 0, "maximum": 1}),
    "presence_penalty": _nullable({**_NUMBER, "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({**_NUMBER, "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({**_NUMBER, "exclusiveMinimum": 0, "maximum": 100}),
    "seed": _nullable({**_INT, "minimum": -(2**63), "maximum": 2**63 - 1}),
    "stop": {
        "anyOf": [
            {**_STRING, "minLength": 1, "maxLength": MAX_STOP_CHARS},
            {
                "type": "array",
                "items": {**_STRING, "minLength": 1, "maxLength": MAX_STOP_CHARS},
                "maxItems": MAX_STOPS,
            },
            {"type": "null"},
        ]
    },
    "n": _nullable({**_INT, "minimum": 1, "maximum": MAX_CHOICES, "default": 1}),
    "stream": _nullable({**_BOOL, "default": False}),
    "stream_options": _nullable({"$ref": _REF + "StreamOptions"}),
    "user": _nullable(_STRING),
    "ignore_eos": _nullable({**_BOOL, "default": False}),
    "logit_bias": _nullable(
        {
            **_OBJECT,
            "description": "token id (as a key) -> bias in [-100, 100]",
            "additionalProperties": {**_NUMBER, "minimum": -100, "maximum": 100},
        }
    ),
    **dict.fromkeys(SAMPLING_UNSUPPORTED, _UNSUPPORTED),
    "skip_special_tokens": _nullable(
        {**_BOOL, "description": "only true is served: false is refused"}
    ),
}

_TEXT_PARTS = {"type": "array", "items": {"$ref": _REF + "ResponsesContentPart"}}
# A chat message's content: a string or a non-empty list of parts.
_CONTENT = {
    "anyOf": [_STRING, {"type": "array", "items": {"$ref": _REF + "ContentPart"}, "minItems": 1}]
}
_TOOL_CALLS = {"type": "array", "items": {"$ref": _REF + "ToolCallBody"}}
_REFUSED = "refused when given: this server does not store responses"

# POST /v1/responses (fermi/server/responses_protocol.py).
_RESPONSES_SCHEMAS: dict[str, Any] = {
    "ResponsesContentPart": {
        **_OBJECT,
        "required": ["type"],
        "properties": {
            "type": {**_STRING, "description": "input_text, output_text or refusal"},
            "text": _nullable(_STRING),
            "refusal": _nullable(_STRING),
        },
    },
    "ResponsesInputItem": {
        **_OBJECT,
        "description": "message (type may be left out), function_call, function_call_output "
        "or reasoning (ignored)",
        "properties": {
            "type": _nullable(_STRING),
            "role": _nullable({"enum": ["user", "assistant", "system", "developer"]}),
            "content": {"anyOf": [_STRING, _TEXT_PARTS, {"type": "null"}]},
            "call_id": _nullable(_STRING),
            "name": _nullable(_STRING),
            "arguments": _nullable({**_STRING, "description": "JSON text"}),
            "output": {"anyOf": [_STRING, _TEXT_PARTS, {"type": "null"}]},
            "id": _nullable(_STRING),
            "status": _nullable(_STRING),
        },
    },
    "ResponsesReasoning": {
        **_OBJECT,
        "properties": {
            "effort": _nullable(
                {"enum": ["none", "minimal", "low", "medium", "high", "xhigh", "max"]}
            ),
            "summary": _nullable(_STRING),
            "generate_summary": _nullable(_STRING),
        },
    },
    "ResponsesText": {
        **_OBJECT,
        "properties": {
            "format": _nullable(
                {**_OBJECT, "description": "text, json_object or json_schema (name, schema)"}
            ),
            "verbosity": _nullable({"enum": ["medium"]}),
        },
    },
    "ResponsesRequest": {
        **_OBJECT,
        "properties": {
            "model": _nullable(_STRING),
            "input": {
                "anyOf": [
                    _STRING,
                    {"type": "array", "items": {"$ref": _REF + "ResponsesInputItem"}},
                    {"type": "null"},
                ],
                "description": "required",
            },
            "instructions": _nullable(_STRING),
            "tools": _nullable(
                {
                    "type": "array",
                    "items": {**_OBJECT, "description": "function tools only"},
                }
            ),
            "tool_choice": {"anyOf": [_STRING, _OBJECT, {"type": "null"}]},
            "parallel_tool_calls": _nullable(_BOOL),
            "text": _nullable({"$ref": _REF + "ResponsesText"}),
            "reasoning": _nullable({"$ref": _REF + "ResponsesReasoning"}),
            "max_output_tokens": _nullable({**_INT, "minimum": 1}),
            "max_tool_calls": _nullable(_INT),
            "temperature": _SAMPLING_FIELDS["temperature"],
            "top_p": _SAMPLING_FIELDS["top_p"],
            "top_logprobs": _nullable({**_INT, "minimum": 0, "maximum": 20}),
            "include": _nullable({"type": "array", "items": {"enum": list(INCLUDABLE)}}),
            "stream": _nullable({**_BOOL, "default": False}),
            "stream_options": _nullable(_OBJECT),
            "store": _nullable({**_BOOL, "description": "accepted; nothing is kept"}),
            "metadata": _nullable({**_OBJECT, "additionalProperties": _STRING}),
            "user": _nullable(_STRING),
            "safety_identifier": _nullable(_STRING),
            "prompt_cache_key": _nullable(_STRING),
            "truncation": _nullable({"enum": ["auto", "disabled"]}),
            "service_tier": _nullable(_STRING),
            "previous_response_id": _nullable({**_STRING, "description": _REFUSED}),
            "conversation": {"description": _REFUSED},
            "background": _nullable({**_BOOL, "description": "true is refused"}),
            "prompt": {"description": "refused when given (OpenAI-hosted prompt templates)"},
            "context_management": {"description": "refused when given"},
            **{
                name: _SAMPLING_FIELDS[name]
                for name in (
                    "top_k",
                    "min_p",
                    "presence_penalty",
                    "frequency_penalty",
                    "repetition_penalty",
                    "seed",
                    "stop",
                    "ignore_eos",
                    "logit_bias",
                )
            },
        },
    },
}

_SCHEMAS: dict[str, Any] = {
    "ContentPart": {
        **_OBJECT,
        "required": ["type"],
        "properties": {
            "type": {
                **_STRING,
                "description": "text (with text), or refusal (with refusal) in an assistant "
                "message; other types are refused",
            },
            "text": _nullable(_STRING),
            "refusal": _nullable(_STRING),
        },
    },
    "FunctionCall": {
        **_OBJECT,
        "required": ["name", "arguments"],
        "properties": {"name": _STRING, "arguments": {**_STRING, "description": "JSON text"}},
    },
    "ToolCallBody": {
        **_OBJECT,
        "required": ["id", "function"],
        "properties": {
            "id": _STRING,
            "type": {**_STRING, "default": "function"},
            "function": {"$ref": _REF + "FunctionCall"},
        },
    },
    # The fields msgspec decodes, and (anyOf) one schema a role, as the server checks them:
    # content is required but for an assistant turn that makes tool calls, and a tool
    # message answers a call of an earlier assistant turn.
    "Message": {
        **_OBJECT,
        "required": ["role"],
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {"anyOf": [_CONTENT, {"type": "null"}]},
            "name": _nullable(_STRING),
            "tool_calls": _nullable(_TOOL_CALLS),
            "tool_call_id": _nullable(_STRING),
        },
        "anyOf": [
            {
                **_OBJECT,
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user"]},
                    "content": _CONTENT,
                    "name": _nullable(_STRING),
                },
            },
            {
                **_OBJECT,
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["assistant"]},
                    "content": _CONTENT,
                    "name": _nullable(_STRING),
                    "tool_calls": _nullable(_TOOL_CALLS),
                },
            },
            {
                **_OBJECT,
                "required": ["role", "tool_calls"],
                "properties": {
                    "role": {"enum": ["assistant"]},
                    "content": {"anyOf": [_CONTENT, {"type": "null"}]},
                    "name": _nullable(_STRING),
                    "tool_calls": {**_TOOL_CALLS, "minItems": 1},
                },
            },
            {
                **_OBJECT,
                "required": ["role", "content", "tool_call_id"],
                "properties": {
                    "role": {"enum": ["tool"]},
                    "content": _CONTENT,
                    "tool_call_id": {
                        **_STRING,
                        "description": "the id of a tool call of an earlier assistant message",
                    },
                },
            },
        ],
    },
    "StreamOptions": {
        **_OBJECT,
        "properties": {"include_usage": {**_BOOL, "default": False}},
    },
    "ChatCompletionRequest": {
        **_OBJECT,
        "required": ["messages"],
        "properties": {
            **_SAMPLING_FIELDS,
            "messages": {"type": "array", "items": {"$ref": _REF + "Message"}, "minItems": 1},
            "max_completion_tokens": _nullable({**_INT, "minimum": 1}),
            "logprobs": _nullable(_BOOL),
            "top_logprobs": _nullable({**_INT, "minimum": 0, "maximum": 20}),
            "thinking": _nullable({"enum": ["on", "off", "auto"]}),
            "chat_template_kwargs": _nullable(_OBJECT),
            "reasoning_effort": _nullable({"enum": list(EFFORT_THINKING)}),
            "think": _nullable(_BOOL),
            "response_format": {
                "description": "OpenAI's structured outputs: text, json_object, json_schema"
            },
            "tools": _nullable({"type": "array", "items": _OBJECT, "minItems": 1}),
            "tool_choice": {"anyOf": [_STRING, _OBJECT, {"type": "null"}]},
            "parallel_tool_calls": _nullable(_BOOL),
            **dict.fromkeys(CHAT_UNSUPPORTED, _UNSUPPORTED),
            "verbosity": _nullable({"enum": ["medium"], "description": "others are refused"}),
            "store": _nullable({"enum": [False], "description": "nothing is stored"}),
            "metadata": _UNSUPPORTED,
            "service_tier": _nullable({"enum": ["auto", "default"]}),
            "modalities": _nullable(
                {"type": "array", "items": _STRING, "description": 'only ["text"] is served'}
            ),
        },
    },
    "CompletionRequest": {
        **_OBJECT,
        "required": ["prompt"],
        "properties": {
            **_SAMPLING_FIELDS,
            "prompt": {
                "anyOf": [
                    _STRING,
                    {"type": "array", "items": _STRING, "maxItems": MAX_PROMPTS},
                    {"type": "array", "items": {**_INT, "minimum": 0}},
                    {
                        "type": "array",
                        "items": {"type": "array", "items": {**_INT, "minimum": 0}},
                        "maxItems": MAX_PROMPTS,
                    },
                ]
            },
            "logprobs": _nullable({**_INT, "minimum": 0, "maximum": 20}),
            "echo": _nullable({**_BOOL, "default": False}),
            "suffix": _nullable(_STRING),
            "best_of": _nullable({**_INT, "description": "refused unless 1 (use n)"}),
            "response_format": {
                "description": "as on chat completions (text, json_object, json_schema), "
                "as vLLM accepts it here"
            },
        },
    },
    "EmbeddingRequest": {
        **_OBJECT,
        "required": ["input"],
        "properties": {
            "input": {
                "anyOf": [
                    {**_STRING, "minLength": 1},
                    {
                        "type": "array",
                        "items": {**_STRING, "minLength": 1},
                        "minItems": 1,
                        "maxItems": MAX_INPUTS,
                    },
                    {"type": "array", "items": {**_INT, "minimum": 0}, "minItems": 1},
                    {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {**_INT, "minimum": 0},
                            "minItems": 1,
                        },
                        "minItems": 1,
                        "maxItems": MAX_INPUTS,
                    },
                ],
                "description": "each input at most the model's context in tokens",
            },
            "model": _nullable(_STRING),
            "dimensions": _nullable(
                {**_INT, "minimum": 1, "description": "at most the model's hidden size"}
            ),
            "encoding_format": _nullable({"enum": ["float", "base64"], "default": "float"}),
            "user": _nullable(_STRING),
        },
    },
    **_RESPONSES_SCHEMAS,
    "Error": {
        **_OBJECT,
        "required": ["error"],
        "properties": {
            "error": {
                **_OBJECT,
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": _STRING,
                    "type": _STRING,
                    "param": _nullable(_STRING),
                    "code": _nullable(_STRING),
                },
            }
        },
    },
}


# Anthropic's Messages API (fermi/server/anthropic_protocol.py).
_BLOCKS = {"type": "array", "items": {"$ref": _REF + "AnthropicBlock"}}
_ANTHROPIC_PROMPT: dict[str, Any] = {
    "model": _STRING,
    "messages": {"type": "array", "items": {"$ref": _REF + "AnthropicMessage"}, "minItems": 1},
    "system": {"anyOf": [_STRING, _BLOCKS, {"type": "null"}]},
    "tools": _nullable({"type": "array", "items": {"$ref": _REF + "AnthropicTool"}}),
    "tool_choice": _nullable({"$ref": _REF + "AnthropicToolChoice"}),
    "thinking": _nullable({"$ref": _REF + "AnthropicThinking"}),
    "output_config": _nullable({"$ref": _REF + "AnthropicOutputConfig"}),
    "output_format": _nullable(
        {
            "$ref": _REF + "AnthropicOutputFormat",
            "description": "the structured-outputs beta's name for output_config.format",
        }
    ),
}
_SCHEMAS |= {
    "AnthropicBlock": {
        **_OBJECT,
        "description": "a content block; the fields it takes depend on its type",
        "required": ["type"],
        "properties": {
            "type": {
                **_STRING,
                "description": "text, tool_use, tool_result, thinking or redacted_thinking "
                "(image, document and other types are refused)",
            },
            "text": _nullable(_STRING),
            "id": _nullable(_STRING),
            "name": _nullable(_STRING),
            "input": {"description": "tool_use: the call's arguments, an object"},
            "tool_use_id": _nullable(_STRING),
            "content": {"anyOf": [_STRING, _BLOCKS, {"type": "null"}]},
            "is_error": {**_BOOL, "default": False},
            "thinking": _nullable(_STRING),
            "signature": _nullable(_STRING),
        },
    },
    "AnthropicMessage": {
        **_OBJECT,
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["user", "assistant"]},
            "content": {"anyOf": [_STRING, _BLOCKS]},
        },
    },
    "AnthropicTool": {
        **_OBJECT,
        "description": "a client tool (server tools, with other types, are refused)",
        "properties": {
            "name": _nullable(_STRING),
            "type": _nullable({"enum": ["custom"]}),
            "description": _nullable(_STRING),
            "input_schema": _nullable(_OBJECT),
        },
    },
    "AnthropicToolChoice": {
        **_OBJECT,
        "required": ["type"],
        "properties": {
            "type": {"enum": ["auto", "any", "tool", "none"]},
            "name": _nullable(_STRING),
            "disable_parallel_tool_use": _nullable(_BOOL),
        },
    },
    "AnthropicThinking": {
        **_OBJECT,
        "required": ["type"],
        "properties": {
            "type": {"enum": ["enabled", "disabled", "adaptive"]},
            "budget_tokens": _nullable(
                {
                    **_INT,
                    "minimum": MIN_BUDGET_TOKENS,
                    "description": "checked, not enforced: thinking ends when the model ends it",
                }
            ),
            "display": _nullable(_STRING),
        },
    },
    "AnthropicOutputFormat": {
        **_OBJECT,
        "required": ["type"],
        "properties": {"type": {"enum": ["json_schema"]}, "schema": _nullable(_OBJECT)},
    },
    "AnthropicOutputConfig": {
        **_OBJECT,
        "properties": {
            "format": _nullable({"$ref": _REF + "AnthropicOutputFormat"}),
            "effort": _nullable(
                {
                    "enum": list(ANTHROPIC_EFFORT),
                    "description": "with adaptive thinking: low turns it off, the others on",
                }
            ),
        },
    },
    "CountTokensRequest": {
        **_OBJECT,
        "required": ["model", "messages"],
        "properties": _ANTHROPIC_PROMPT,
    },
    "MessagesRequest": {
        **_OBJECT,
        "required": ["model", "messages", "max_tokens"],
        "properties": {
            **_ANTHROPIC_PROMPT,
            "max_tokens": {
                **_INT,
                "minimum": 0,
                "description": "0: prefill the prompt for later prefix reuse, reply nothing",
            },
            "stop_sequences": _nullable(
                {
                    "type": "array",
                    "items": {**_STRING, "minLength": 1, "maxLength": MAX_STOP_CHARS},
                    "maxItems": MAX_STOPS,
                }
            ),
            "temperature": _SAMPLING_FIELDS["temperature"],
            "top_p": _SAMPLING_FIELDS["top_p"],
            "top_k": _SAMPLING_FIELDS["top_k"],
            "stream": _nullable({**_BOOL, "default": False}),
            "metadata": _nullable(_OBJECT),
            "seed": _SAMPLING_FIELDS["seed"],
            "ignore_eos": _nullable({**_BOOL, "default": False}),
            **dict.fromkeys(MESSAGES_UNSUPPORTED, _UNSUPPORTED),
        },
    },
    "AnthropicError": {
        **_OBJECT,
        "required": ["type", "error"],
        "properties": {
            "type": {"enum": ["error"]},
            "error": {
                **_OBJECT,
                "required": ["type", "message"],
                "properties": {"type": _STRING, "message": _STRING},
            },
        },
    },
}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": _REF + name}}}}


# Needed when the server runs with --api-key; /health, /metrics and this description never.
_BEARER = [{"bearer": []}]

_ERROR = {
    "description": "OpenAI's error shape",
    "content": {"application/json": {"schema": {"$ref": _REF + "Error"}}},
}


def _generation(summary: str, body: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": _BEARER,
            "requestBody": _json_body(body),
            "responses": {
                "200": {
                    "description": "the whole response, or server-sent events when stream is true",
                    "content": {"application/json": {}, "text/event-stream": {}},
                },
                **{status: _ERROR for status in ("400", "401", "404", "413", "429", "503")},
            },
        }
    }


_ANTHROPIC_ERROR = {
    "description": "Anthropic's error shape",
    "content": {"application/json": {"schema": {"$ref": _REF + "AnthropicError"}}},
}


def _anthropic(summary: str, body: str, reply: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            # Anthropic's x-api-key, or a Bearer token.
            "security": [{"apiKey": []}, *_BEARER],
            "requestBody": _json_body(body),
            "responses": {
                "200": {"description": reply, "content": {"application/json": {}}},
                **{
                    status: _ANTHROPIC_ERROR
                    for status in ("400", "401", "404", "413", "500", "503", "529")
                },
            },
        }
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Fermi Infer", "version": "1"},
    "paths": {
        "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest"),
        "/v1/completions": _generation("Text completion", "CompletionRequest"),
        "/v1/embeddings": {
            "post": {
                "summary": "Embeddings (embedding checkpoints only)",
                "security": _BEARER,
                "requestBody": _json_body("EmbeddingRequest"),
                "responses": {
                    "200": {
                        "description": "OpenAI's embedding list",
                        "content": {"application/json": {}},
                    },
                    **{status: _ERROR for status in ("400", "401", "404", "413", "429", "503")},
                },
            }
        },
        "/v1/messages": _anthropic(
            "Anthropic Messages",
            "MessagesRequest",
            "a message, or Anthropic's server-sent events when stream is true",
        ),
        "/v1/messages/count_tokens": _anthropic(
            "The prompt's tokens, as /v1/messages renders it", "CountTokensRequest", "input_tokens"
        ),
        "/v1/responses": _generation(
            "Response (OpenAI's Responses API, stateless)", "ResponsesRequest"
        ),
        "/v1/responses/input_tokens": {
            "post": {
                "summary": "The input tokens a response with this body would have",
                "security": _BEARER,
                "requestBody": _json_body("ResponsesRequest"),
                "responses": {
                    "200": {
                        "description": '{"object": "response.input_tokens", "input_tokens": N}'
                    },
                    **{status: _ERROR for status in ("400", "401", "404", "413")},
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The served model",
                "security": _BEARER,
                "responses": {"200": {"description": "a model list"}, "401": _ERROR},
            }
        },
        "/health": {
            "get": {
                "summary": "200 while every engine steps, 503 otherwise; `warming` lists the "
                "replicas still compiling and capturing shapes in idle time",
                "responses": {"200": {"description": "healthy"}, "503": {"description": "stalled"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "the Prometheus text format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
    },
}

OPENAPI_JSON: bytes = msgspec.json.encode(OPENAPI)
