"""Chat templates: a conversation (OpenAI-style messages) -> the prompt text a chat model expects.

A GGUF file carries its model's template as Jinja source in ``tokenizer.chat_template`` (named
alternatives in ``tokenizer.chat_template.NAME``), copied from Hugging Face's
``tokenizer_config.json``. It is rendered here as transformers' ``apply_chat_template(...,
tokenize=False)`` renders it: jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, transformers' ``tojson`` filter (no ASCII escaping,
``indent``/``separators``/``sort_keys`` arguments), ``raise_exception``, ``strftime_now``, a
``namespace`` that refuses underscore names, and the variables ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` (the vocabulary's BOS/EOS text) plus any
extra keyword (``enable_thinking=False``, ...).

A file without a template gets ChatML, as llama.cpp does (``common_chat_templates_init``:
"defaults to chatml"). ``resolve_template`` also takes a built-in name (``BUILTIN_TEMPLATES``:
chatml, llama2, llama3, mistral, zephyr, gemma, phi3), a Jinja file, a named template of the file,
or Jinja source itself, as llama.cpp's ``--chat-template``.

Rendered text is tokenized with ``parse_special=True`` (``<|im_start|>`` becomes its control token)
and without an extra BOS when the text already starts with the BOS token's text
(``prompt_tokens``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from engine.errors import HalfbyteError

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "DEFAULT_TEMPLATE_NAME",
    "normalize_messages",
    "resolve_template",
]

# llama.cpp's CHATML_TEMPLATE_SRC (common/chat.cpp), the fallback for files without a template.
_CHATML = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)

# Llama-2-chat (meta-llama/Llama-2-7b-chat-hf): the system prompt inside the first [INST] as <<SYS>>;
# BOS before every user turn, EOS after every answer. (The prompt always ends with [/INST].)
_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Llama 3 Instruct (meta-llama/Meta-Llama-3-8B-Instruct).
_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral-7B-Instruct v0.1/v0.2, with a system prompt put before the first user message (as
# llama.cpp's mistral formats and Mistral's later templates do).
_MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{{ '[INST] ' + system_message + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Zephyr (HuggingFaceH4/zephyr-7b-beta): one block per line, which trim_blocks makes work.
_ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Gemma (google/gemma-7b-it), "assistant" is "model"; a system prompt goes at the start of the
# first user turn (Gemma 2/3's templates do this).
_GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Phi-3 (microsoft/Phi-3-mini-4k-instruct).
_PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama2": _LLAMA2,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "zephyr": _ZEPHYR,
    "gemma": _GEMMA,
    "phi3": _PHI3,
}
DEFAULT_TEMPLATE_NAME = "chatml"

# Text that ends a turn in the known formats: generation also stops where one of these appears as
# text (a model whose vocabulary lacks the token, e.g. the demo model under the ChatML fallback).
TURN_END_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|im_start|>")

ROLES = ("system", "user", "assistant", "tool", "developer", "function")


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise HalfbyteError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # dict() without handing the template the dict type itself (as transformers)
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces refuse underscore names (no way to CPython internals), as transformers'.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    class Generation(jinja2.ext.Extension):
        # transformers' {% generation %} ... {% endgeneration %} (assistant-mask marking): here
        # it renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise HalfbyteError(f"chat template: Jinja syntax error on line {exc.lineno}: {exc.message}") from None


def _plain(value: Any) -> Any:
    """Messages and tools as plain JSON-like data (what transformers hands its templates)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _content_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, None, or OpenAI content parts of type "text"
    joined by newlines (llama.cpp's concatenation for text-only templates)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise HalfbyteError(f"{where}: only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise HalfbyteError(f"{where}: content must be a string, a list of text parts or null, "
                        f"got {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style ``messages`` (a non-empty list of ``{"role", "content", ...}``) and
    return plain copies with text content. Unknown roles and malformed entries are a
    ``HalfbyteError`` naming the message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise HalfbyteError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise HalfbyteError("messages must not be empty")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise HalfbyteError(f"{where} must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise HalfbyteError(f"{where}: role must be a string, got {type(role).__name__}")
        if role not in ROLES:
            raise HalfbyteError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in message and not message.get("tool_calls"):
            raise HalfbyteError(f"{where}: missing content")
        plain = _plain(message)
        plain["content"] = _content_text(message.get("content"), where)
        result.append(plain)
    return result


class ChatTemplate:
    """A compiled chat template with the vocabulary's BOS/EOS text.

    ``render(messages, add_generation_prompt=True, tools=None, **extra) -> str``."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "") -> None:
        if not isinstance(source, str) or not source.strip():
            raise HalfbyteError("chat template must be non-empty Jinja text")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name or "custom"
        self._template = _compile(source)

    @property
    def stop_texts(self) -> list[str]:
        """Turn-ending texts this template writes (``<|im_end|>``, ...): stop strings for
        generation, for models whose vocabulary does not have them as tokens."""
        texts = [t for t in TURN_END_TEXTS if t in self.source]
        if "eos_token" in self.source and self.eos_token and self.eos_token not in texts:
            texts.append(self.eos_token)
        return texts

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: Any = None, **extra: Any) -> str:
        """The prompt text for ``messages`` (``normalize_messages`` is applied first)."""
        import jinja2

        messages = normalize_messages(messages)
        if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
            raise HalfbyteError(f"tools must be a list of JSON schemas, got {type(tools).__name__}")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **_plain(extra)}
        try:
            return self._template.render(messages=messages, tools=_plain(tools), documents=None,
                                         add_generation_prompt=bool(add_generation_prompt), **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise HalfbyteError(f"chat template ({self.name}): {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise HalfbyteError(f"chat template ({self.name}) failed on these messages: "
                                f"{type(exc).__name__}: {exc}") from None

    def __repr__(self) -> str:
        first = self.source.strip().splitlines()[0] if self.source.strip() else ""
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars, first line {first[:40]!r})"


def file_templates(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The templates a GGUF file holds: ``{"default": ..., NAME: ...}`` (string values only)."""
    found = {}
    value = metadata.get("tokenizer.chat_template")
    if isinstance(value, str) and value.strip():
        found["default"] = value
    prefix = "tokenizer.chat_template."
    for key, value in metadata.items():
        if key.startswith(prefix) and isinstance(value, str) and value.strip():
            found[key[len(prefix):]] = value
    return found


def _special_text(tokenizer: Any, token_id: int | None) -> str:
    if tokenizer is None or token_id is None:
        return ""
    return tokenizer.token_piece(token_id)


def resolve_template(metadata: Mapping[str, Any], tokenizer: Any = None, spec: str | None = None) -> ChatTemplate:
    """The chat template to use for a file.

    ``spec`` None: the file's ``tokenizer.chat_template``, else ChatML (llama.cpp's fallback).
    Otherwise, in this order: a name of the file's own templates (``tokenizer.chat_template.NAME``,
    or ``default``), a built-in name (``BUILTIN_TEMPLATES``), a path to a Jinja file, or Jinja
    source itself (anything containing ``{{`` or ``{%``)."""
    bos = _special_text(tokenizer, getattr(tokenizer, "bos_id", None))
    eos = _special_text(tokenizer, getattr(tokenizer, "eos_id", None))
    own = file_templates(metadata)
    if spec is None:
        if "default" in own:
            return ChatTemplate(own["default"], bos, eos, name="file")
        return ChatTemplate(BUILTIN_TEMPLATES[DEFAULT_TEMPLATE_NAME], bos, eos,
                            name=f"{DEFAULT_TEMPLATE_NAME} (fallback: the file has no chat template)")
    if not isinstance(spec, str) or not spec:
        raise HalfbyteError("chat template must be a name, a file or Jinja text")
    if spec in own:
        return ChatTemplate(own[spec], bos, eos, name=f"file:{spec}")
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[spec], bos, eos, name=spec)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec, bos, eos, name="inline")
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                source = f.read()
        except OSError as exc:
            raise HalfbyteError(f"{spec}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise HalfbyteError(f"{spec}: not UTF-8 text") from None
        return ChatTemplate(source, bos, eos, name=spec)
    names = sorted(BUILTIN_TEMPLATES) + [n for n in own if n != "default"]
    raise HalfbyteError(f"unknown chat template {spec!r}: not a file, and not one of {', '.join(names)}")


def prompt_tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat prompt: control-token text parsed (``<|im_start|>``), BOS added
    as the vocabulary says unless the template already wrote it (llama.cpp's server does the same)."""
    add_bos = tokenizer.add_bos
    if add_bos and tokenizer.bos_id is not None:
        bos_text = tokenizer.token_piece(tokenizer.bos_id)
        if bos_text and text.startswith(bos_text):
            add_bos = False
    return tokenizer.encode(text, add_bos=add_bos, parse_special=True)
