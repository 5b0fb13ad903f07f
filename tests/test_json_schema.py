"""JSON Schema -> GBNF (engine.json_schema): the grammar accepts what the schema allows (checked
with the ``jsonschema`` package on many generated outputs of the demo model, 20 seeds per schema),
through ``response_format`` (llama-cpp-python / OpenAI), ``run -j/-jf`` and the server."""

from __future__ import annotations

import json

import pytest

from engine.errors import HalfbyteError
from engine.grammar import Grammar, grammar_for_request
from engine.json_schema import schema_to_gbnf

jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema package validates the outputs "
                                                      "(pip install jsonschema)")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age"]}
MIXED = {"type": "object", "properties": {
    "a": {"enum": ["x", "y", 3]}, "b": {"const": True}, "c": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    "d": {"type": "string", "format": "date"}, "p": {"type": "string", "pattern": "^[A-Z][a-z]{2,4}-\\d{3}$"},
    "u": {"type": ["boolean", "null"]}}, "required": ["d", "p"], "additionalProperties": False}
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["v"]}}, "$ref": "#/$defs/node"}
MERGED = {"definitions": {"base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
          "allOf": [{"$ref": "#/definitions/base"},
                    {"properties": {"ok": {"type": "boolean"}, "t": {"type": "string", "format": "time"}},
                     "required": ["ok"]}]}
EXTRA = {"type": "object", "properties": {"k": {"type": "string", "minLength": 2, "maxLength": 4}},
         "additionalProperties": {"type": "number"}}
SCHEMAS = {"person": PERSON, "mixed": MIXED, "tree": TREE, "merged": MERGED, "extra": EXTRA}


@pytest.fixture(scope="module")
def demo_model():
    from engine.default_model import default_model_path
    from engine.model import Model

    return Model.load(default_model_path(), n_ctx=512)


def accepts(schema, value) -> bool:
    return Grammar(schema_to_gbnf(schema)).accepts_text(json.dumps(value))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_makes_a_grammar(name):
    Grammar(schema_to_gbnf(SCHEMAS[name]))


def test_grammars_accept_valid_and_refuse_invalid_instances():
    assert accepts(PERSON, {"name": "Ann", "age": 3})
    assert accepts(PERSON, {"name": "Ann", "age": 3, "tags": ["a", "b"]})
    assert not accepts(PERSON, {"age": 3})  # required
    assert not accepts(PERSON, {"name": "Ann", "age": 3.5})  # integer
    assert not accepts(PERSON, {"name": "A" * 13, "age": 3})  # maxLength
    assert not accepts(PERSON, {"name": "Ann", "age": 3, "tags": []})  # minItems
    assert not accepts(PERSON, {"name": "Ann", "age": 3, "tags": ["a"] * 4})  # maxItems
    assert accepts(MIXED, {"d": "2024-02-29", "p": "Abc-123", "a": 3, "c": None, "u": True})
    assert not accepts(MIXED, {"d": "2024-13-01", "p": "Abc-123"})  # date format
    assert not accepts(MIXED, {"d": "2024-01-01", "p": "abc-123"})  # pattern
    assert not accepts(MIXED, {"d": "2024-01-01", "p": "Abc-123", "z": 1})  # additionalProperties false
    assert not accepts(MIXED, {"d": "2024-01-01", "p": "Abc-123", "a": "z"})  # enum
    assert accepts(TREE, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]})
    assert not accepts(TREE, {"v": 1, "kids": [{"v": 2}, {"v": 3}, {"v": 4}]})
    assert accepts(MERGED, {"id": 1, "ok": True, "t": "12:30:00Z"})
    assert not accepts(MERGED, {"ok": True})
    assert accepts(EXTRA, {"k": "abc", "x": 1.5, "y": -2})
    assert not accepts(EXTRA, {"k": "abc", "x": "no"})
    assert accepts({"type": "object"}, {"any": [1, {"x": None}]})
    assert accepts({}, [1, "two", None])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_outputs_validate(demo_model, name):
    """20 seeds: every finished output parses and validates; an output cut by max_tokens (an
    unbounded recursive schema can nest deeper, an unbounded key run longer than the budget) the minority."""
    schema = SCHEMAS[name]
    finished = 0
    for seed in range(20):
        out = demo_model.create_completion("And the LORD said", max_tokens=300, seed=seed,
                                           response_format={"type": "json_object", "schema": schema})
        choice = out["choices"][0]
        if choice["finish_reason"] == "length":
            continue
        jsonschema.validate(json.loads(choice["text"]), schema)
        finished += 1
    assert finished >= 8


def test_chat_response_formats(demo_model):
    messages = [{"role": "user", "content": "Give me JSON"}]
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}):
        out = demo_model.create_chat_completion(messages, response_format=response_format, seed=4, max_tokens=300)
        text = out["choices"][0]["message"]["content"]
        if out["choices"][0]["finish_reason"] == "stop":
            value = json.loads(text)
            assert isinstance(value, dict)
            if response_format["type"] == "json_schema":
                jsonschema.validate(value, PERSON)


def test_request_forms_and_errors():
    assert grammar_for_request(None, {"type": "json_object"}) is grammar_for_request(None, {"type": "json_object"})
    assert grammar_for_request(json_schema=json.dumps(PERSON)) is grammar_for_request(json_schema=PERSON)
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json"):
        with pytest.raises(HalfbyteError):
            grammar_for_request(None, bad)
    with pytest.raises(HalfbyteError, match="not valid JSON"):
        grammar_for_request(json_schema="{nope")
    with pytest.raises(HalfbyteError, match="points nowhere"):
        schema_to_gbnf({"$ref": "#/$defs/missing"})
    with pytest.raises(HalfbyteError, match="only simple patterns"):
        schema_to_gbnf({"type": "string", "pattern": "(?=x)y"})


def run_cli(*args):
    from click.testing import CliRunner

    from engine.cli import main

    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_run_json_schema_flags(tmp_path):
    result = run_cli("-p", "And", "-n", 300, "-s", 3, "-j", json.dumps(PERSON))
    assert result.exit_code == 0, result.output
    if "stopped: eos" in result.stderr:
        jsonschema.validate(json.loads(result.stdout), PERSON)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(MIXED))
    result = run_cli("-p", "And", "-n", 300, "-s", 5, "-jf", path)
    assert result.exit_code == 0, result.output
    if "stopped: eos" in result.stderr:
        jsonschema.validate(json.loads(result.stdout), MIXED)
    bad = run_cli("-p", "And", "-j", "{oops")
    assert bad.exit_code == 1 and "-j: the JSON schema is not valid JSON" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_server_response_format():
    from types import SimpleNamespace

    from engine.server import ApiError, Service

    service = Service(SimpleNamespace(n_vocab=4096), SimpleNamespace(n_ctx=64))
    body = {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}
    assert service.settings(body, chat=True).grammar is grammar_for_request(json_schema=PERSON)
    assert service.settings({"prompt": "x", "json_schema": PERSON}, chat=False).grammar is not None
    with pytest.raises(ApiError):
        service.settings({"prompt": "x", "response_format": {"type": "nope"}}, chat=False)
