"""JSON Schema -> GBNF, covering what llama.cpp's converter covers (``schema_to_gbnf``).

Supported: ``type`` (one or a list: object, array, string, number, integer, boolean, null), ``enum``,
``const``, objects with ``properties`` / ``required`` (required ones first, then the optional ones in
their order, any subset) and ``additionalProperties`` (false or absent: no other keys, as llama.cpp;
true or a schema: more keys after the listed ones), arrays with ``items`` / ``prefixItems`` and
``minItems`` / ``maxItems``, nested schemas, ``$ref`` to ``#/$defs/...``, ``#/definitions/...`` or
``#`` (recursive schemas become recursive rules), ``anyOf`` / ``oneOf`` (alternatives), ``allOf``
(object schemas merged), strings with ``minLength`` / ``maxLength``, ``format`` date, time,
date-time and uuid, and ``pattern`` for simple regular expressions (literals, ``.``, classes,
``\\d \\w \\s``, groups, ``|``, ``* + ? {m,n}``, ``^ $``). ``{}`` or ``true``: any JSON value. Not
constrained (accepted, then ignored): numeric ``minimum`` / ``maximum`` / ``multipleOf``,
``uniqueItems``, other formats. Whitespace between tokens is llama.cpp's ``space`` rule (at most
one space, or newlines with up to 20 indentation characters).
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.errors import HalfbyteError

SPACE = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'
PRIMITIVES = {
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "integral-part": '[0] | [1-9] [0-9]{0,15}',
    "decimal-part": '[0-9]{1,16}',
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "integer": '("-"? integral-part) space',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" space',
    "value": 'object | array | string | number | boolean | null',
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )'),
    "date-time": 'date "T" time',
    "uuid": ('[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
             '[0-9a-fA-F]{12}'),
}
DEPENDS = {
    "number": ["integral-part", "decimal-part"], "integer": ["integral-part"], "string": ["char"],
    "value": ["object", "array", "string", "number", "boolean", "null"], "object": ["string", "value"],
    "array": ["value"], "date-time": ["date", "time"],
}
FORMATS = ("date", "time", "date-time", "uuid")


def _literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_literal(value: Any) -> str:
    return _literal(json.dumps(value, ensure_ascii=False)) + " space"


class _Converter:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, str] = {"space": SPACE.split(" ::= ", 1)[1]}
        self.refs: dict[str, str] = {}

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dep in DEPENDS.get(name, ()):
                self.primitive(dep)
        return name

    def add(self, name: str, body: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        key, n = base, 1
        while key in self.rules and self.rules[key] != body:
            n += 1
            key = f"{base}{n}"
        self.rules[key] = body
        return key

    def resolve(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise HalfbyteError(f"JSON schema: only local $ref (#/...) are supported, got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise HalfbyteError(f"JSON schema: $ref {ref!r} points nowhere")
        return node

    def visit(self, schema: Any, name: str) -> str:
        """The name of a rule matching ``schema`` (a JSON value followed by space)."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise HalfbyteError("JSON schema: false matches nothing")
        if not isinstance(schema, dict):
            raise HalfbyteError(f"JSON schema: a schema must be an object or a boolean, got {schema!r}")
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref not in self.refs:
                rule = self.add(ref.rsplit("/", 1)[-1] or "root-ref", "")
                self.refs[ref] = rule
                self.rules[rule] = self.visit(self.resolve(ref), rule)
            return self.refs[ref]
        if "const" in schema:
            return self.add(name, _json_literal(schema["const"]))
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise HalfbyteError("JSON schema: enum must be a non-empty list")
            return self.add(name, " | ".join(_json_literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise HalfbyteError(f"JSON schema: {key} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != key}
                parts = [self.visit({**rest, **o} if isinstance(o, dict) and rest else o, f"{name}-{i}")
                         for i, o in enumerate(options)]
                return self.add(name, " | ".join(parts))
        if "allOf" in schema:
            return self.visit(self.merge(schema), name)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise HalfbyteError("JSON schema: an empty type list matches nothing")
            parts = [self.visit({**schema, "type": k}, f"{name}-{k}") for k in kind]
            return self.add(name, " | ".join(parts))
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            elif any(k in schema for k in ("minLength", "maxLength", "pattern", "format")):
                kind = "string"
            else:
                return self.primitive("value")
        if kind == "object":
            return self.object(schema, name)
        if kind == "array":
            return self.array(schema, name)
        if kind == "string":
            return self.string(schema, name)
        if kind in ("number", "integer", "boolean", "null"):
            return self.primitive(kind)
        raise HalfbyteError(f"JSON schema: unknown type {kind!r}")

    def merge(self, schema: dict) -> dict:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            while isinstance(part, dict) and "$ref" in part:
                part = self.resolve(part["$ref"])
            if not isinstance(part, dict):
                raise HalfbyteError("JSON schema: allOf parts must be objects")
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                else:
                    merged.setdefault(key, value)
        return merged

    def object(self, schema: dict, name: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise HalfbyteError("JSON schema: properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise HalfbyteError("JSON schema: required must be a list")
        extra = schema.get("additionalProperties")
        if not properties and "additionalProperties" not in schema and not required:
            return self.primitive("object")
        self.primitive("string")
        pairs: list[tuple[str, bool]] = []
        for key, sub in properties.items():
            value = self.visit(sub, f"{name}-{key}")
            kv = self.add(f"{name}-{key}-kv", f"{_literal(json.dumps(key, ensure_ascii=False))} space \":\" space "
                                              f"{value}")
            pairs.append((kv, key in required))
        for key in required:
            if key not in properties:  # required but not described: any value
                kv = self.add(f"{name}-{key}-kv", f"{_literal(json.dumps(key, ensure_ascii=False))} space \":\" "
                                                  f"space {self.primitive('value')}")
                pairs.append((kv, True))
        if extra is not None and extra is not False:
            value = self.visit({} if extra is True else extra, f"{name}-additional-value")
            kv = self.add(f"{name}-additional-kv", f"string \":\" space {value}")
            more: str | None = self.add(f"{name}-additional", f"{kv} (\",\" space {kv})*")
        else:
            more = None
        req = [kv for kv, r in pairs if r]
        opt = [kv for kv, r in pairs if not r]
        if more is not None:
            opt.append(more)
        body = '"{" space '
        if req:
            body += ' "," space '.join(req)
            body += "".join(f' ("," space {kv})?' for kv in opt)
        elif opt:
            # any subset of the optional ones, in order, comma-separated
            choices = []
            for i, kv in enumerate(opt):
                choices.append(kv + "".join(f' ("," space {k})?' for k in opt[i + 1:]))
            body += "(" + " | ".join(choices) + ")?"
        return self.add(name, body + ' "}" space')

    def array(self, schema: dict, name: str) -> str:
        prefix = schema.get("prefixItems")
        items = schema.get("items", {} if prefix is None else False)
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        if prefix is not None:
            if not isinstance(prefix, list):
                raise HalfbyteError("JSON schema: prefixItems must be a list")
            parts = [self.visit(p, f"{name}-{i}") for i, p in enumerate(prefix)]
            if not parts:
                return self.add(name, '"[" space "]" space')
            body = '"[" space ' + ' "," space '.join(parts)
            if items is not False:
                item = self.visit(items, f"{name}-item")
                body += f' ("," space {item})*'
            return self.add(name, body + ' "]" space')
        item = self.visit(items, f"{name}-item")
        if hi is not None and int(hi) < lo:
            raise HalfbyteError("JSON schema: maxItems is below minItems")
        if hi is not None and int(hi) == 0:
            return self.add(name, '"[" space "]" space')
        more_lo = max(lo - 1, 0)
        more = f"{{{more_lo},}}" if hi is None else f"{{{more_lo},{int(hi) - 1}}}"
        inner = f'{item} ("," space {item}){more}'
        body = f'"[" space {inner if lo > 0 else "(" + inner + ")?"} "]" space'
        return self.add(name, body)

    def string(self, schema: dict, name: str) -> str:
        fmt = schema.get("format")
        if fmt in FORMATS:
            return self.add(f"{fmt}-string", f'"\\"" {self.primitive(fmt)} "\\"" space')
        if "pattern" in schema:
            return self.add(name, f'"\\"" {_Regex(schema["pattern"], self).convert()} "\\"" space')
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        if lo == 0 and hi is None:
            return self.primitive("string")
        self.primitive("char")
        count = f"{{{lo},}}" if hi is None else f"{{{lo},{int(hi)}}}"
        return self.add(name, f'"\\"" char{count} "\\"" space')

    def text(self) -> str:
        return "\n".join(f"{k} ::= {v}" for k, v in self.rules.items()) + "\n"


class _Regex:
    """A simple regular expression as the GBNF of a JSON string's content (JSON-escaped)."""

    CLASSES = {"d": "[0-9]", "w": "[a-zA-Z0-9_]", "s": "[ \\t]", "D": "[^0-9\"\\\\]", "W": "[^a-zA-Z0-9_\"\\\\]",
               "S": "[^ \\t\\n\"\\\\]"}

    def __init__(self, pattern: str, converter: _Converter) -> None:
        if not isinstance(pattern, str):
            raise HalfbyteError("JSON schema: pattern must be a string")
        self.p = pattern
        self.i = 0
        self.converter = converter

    def fail(self, what: str) -> HalfbyteError:
        return HalfbyteError(f"JSON schema: pattern {self.p!r} at {self.i}: {what} (only simple patterns work)")

    def convert(self) -> str:
        if self.p.startswith("^"):
            self.i = 1
        body = self.alternation()
        if self.i < len(self.p) and self.p[self.i] == "$" and self.i == len(self.p) - 1:
            self.i += 1
        if self.i != len(self.p):
            raise self.fail(f"unexpected {self.p[self.i]!r}")
        return f"({body})"

    def alternation(self) -> str:
        parts = [self.sequence()]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            parts.append(self.sequence())
        return " | ".join(p or '""' for p in parts)

    def sequence(self) -> str:
        out = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            if self.p[self.i] == "$" and self.i == len(self.p) - 1:
                break
            atom = self.atom()
            out.append(self.quantified(atom))
        return " ".join(out)

    def quantified(self, atom: str) -> str:
        if self.i >= len(self.p):
            return atom
        c = self.p[self.i]
        if c in "*+?":
            self.i += 1
            quant = c
        elif c == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", self.p[self.i:])
            if not m:
                raise self.fail("bad repetition")
            self.i += m.end()
            quant = m.group(0)
        else:
            return atom
        if self.i < len(self.p) and self.p[self.i] in "?+":  # lazy / possessive: same language
            self.i += 1
        return f"({atom}){quant}"

    def atom(self) -> str:
        c = self.p[self.i]
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?", self.i):
                raise self.fail("lookarounds and named groups are not supported")
            inner = self.alternation()
            if self.i >= len(self.p) or self.p[self.i] != ")":
                raise self.fail("expecting ')'")
            self.i += 1
            return f"({inner})"
        if c == ".":
            self.i += 1
            return self.converter.primitive("char")
        if c == "[":
            return self.char_class()
        if c == "\\":
            e = self.p[self.i + 1:self.i + 2]
            self.i += 2
            if e in self.CLASSES:
                return self.CLASSES[e]
            if not e:
                raise self.fail("dangling backslash")
            return self.literal(e)
        if c in "*+?{":
            raise self.fail(f"nothing to repeat before {c!r}")
        self.i += 1
        return self.literal(c)

    @staticmethod
    def literal(ch: str) -> str:
        return _literal(json.dumps(ch, ensure_ascii=False)[1:-1])

    def char_class(self) -> str:
        self.i += 1
        negated = self.p.startswith("^", self.i)
        if negated:
            self.i += 1
        items = []
        first = True
        while self.i < len(self.p) and (self.p[self.i] != "]" or first):
            first = False
            c = self.p[self.i]
            if c == "\\":
                e = self.p[self.i + 1:self.i + 2]
                self.i += 2
                if e in ("d", "w", "s"):
                    items.append(self.CLASSES[e][1:-1])
                    continue
                c = {"n": "\n", "t": "\t", "r": "\r"}.get(e, e)
            else:
                self.i += 1
            if c in '"\\' and not negated:
                raise self.fail('quotes and backslashes in a character class are not supported')
            items.append(self._class_char(c))
            if self.p.startswith("-", self.i) and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                end = self.p[self.i]
                self.i += 1
                items[-1] += "-" + self._class_char(end)
        if self.i >= len(self.p):
            raise self.fail("unterminated character class")
        self.i += 1
        if negated:
            return "[^" + "".join(items) + '"\\\\\\x00-\\x1F\\x7F]'
        return "[" + "".join(items) + "]"

    @staticmethod
    def _class_char(c: str) -> str:
        if c in "]\\-[":
            return "\\" + c
        if c == "\n":
            return "\\n"
        if c == "\t":
            return "\\t"
        if ord(c) < 0x20:
            return f"\\x{ord(c):02X}"
        return c


def schema_to_gbnf(schema: Any) -> str:
    """GBNF text whose ``root`` matches exactly the JSON texts (followed by llama.cpp's optional
    whitespace) that the converter makes for ``schema`` (a dict, or a JSON string)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise HalfbyteError(f"the JSON schema is not valid JSON: {exc}") from None
    converter = _Converter(schema)
    top = converter.visit(schema, "root")
    if top != "root":
        converter.rules["root"] = top
    return converter.text()
