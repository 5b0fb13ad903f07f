"""Chat templates (engine.chat) against transformers' apply_chat_template, and end-of-generation tokens.

References: transformers' ``PreTrainedTokenizerFast.apply_chat_template(..., tokenize=False)`` on the
real Llama 3 and Qwen3 tokenizer_config.json templates (/work/shared/fixtures/tokenizers), and on
the built-in templates (written after Llama-2-chat, Mistral-instruct, ChatML, Zephyr, Gemma, Phi-3,
Llama 3). EOG ids against the rule of llama.cpp's vocabulary loader (llama-vocab.cpp).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.chat import BUILTIN_TEMPLATES, ChatTemplate, normalize_messages, prompt_tokens, resolve_template
from engine.default_model import default_model_path
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile, GGUFValueType, GGUFWriter
from engine.tokenizer import Tokenizer, TokenType

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"

SYSTEM = {"role": "system", "content": "You are a terse assistant. Ünïcödé \"quotes\" <b>&</b> 日本語"}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello!"}],
    "system": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Hello. How can I help?\n"},
        {"role": "user", "content": "Tell me a joke.\n\nA short one."},
    ],
    "ends with assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ],
}


def write_model_copy(dst: Path, extra: dict, src: Path | None = None) -> Path:
    """``src`` (default: the demo model) with metadata ``extra`` {key: (value, GGUFValueType)} added."""
    src = src or default_model_path()
    with GGUFFile(src) as f, GGUFWriter(dst) as out:
        out.copy_metadata(f)
        for key, (value, value_type) in extra.items():
            out.add(key, value, value_type)
        infos = list(f.tensors.values())
        for info in infos:
            out.add_tensor_info(info.name, info.shape, info.ggml_type)
        for info in infos:
            out.write_tensor(info.name, f.tensor_bytes(info.name))
        out.finish()
    return dst


def _config(name: str) -> dict:
    config = json.loads((FIXTURES / name / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    return config


@pytest.fixture(scope="module")
def hf_tokenizers():
    transformers = pytest.importorskip("transformers")
    result = {name: transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / name / "tokenizer.json"),
                                                         **_config(name))
              for name in ("llama3", "qwen")}
    # For the built-in templates: a SentencePiece-style BOS/EOS pair.
    result["builtin"] = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(FIXTURES / "llama3" / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    return result


@pytest.mark.parametrize("name", ["llama3", "qwen"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_match_transformers(hf_tokenizers, name, conversation, add_generation_prompt):
    reference = hf_tokenizers[name]
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    template = ChatTemplate(_config(name)["chat_template"], reference.bos_token or "", reference.eos_token or "")
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_qwen_tools_tool_calls_and_extra_variables(hf_tokenizers):
    """tools (tojson of nested schemas, non-ASCII kept), assistant tool calls with dict arguments,
    tool responses, and a template keyword (enable_thinking)."""
    reference = hf_tokenizers["qwen"]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Météo for a city — 天気",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        SYSTEM,
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "<think>\nhot?\n</think>\n\nIt is 21 °C."},
        {"role": "user", "content": "Thanks"},
    ]
    template = ChatTemplate(_config("qwen")["chat_template"], "", reference.eos_token)
    for extra in ({}, {"enable_thinking": False}):
        expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                 **extra)
        assert template.render(messages, tools=tools, **extra) == expected
        assert "Météo" in expected and "天気" in expected


ALTERNATING = ("llama2", "mistral", "gemma")  # user/assistant must alternate after the system prompt


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_templates_match_transformers(hf_tokenizers, name, conversation, add_generation_prompt):
    reference = hf_tokenizers["builtin"]
    messages = CONVERSATIONS[conversation]
    source = BUILTIN_TEMPLATES[name]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=source)
    assert ChatTemplate(source, "<s>", "</s>").render(messages, add_generation_prompt) == expected


def test_builtin_formats():
    """What each built-in writes, spelled out for the multi-turn conversation."""
    messages = CONVERSATIONS["multi-turn"]
    sys_text = SYSTEM["content"]
    render = {name: ChatTemplate(src, "<s>", "</s>").render(messages) for name, src in BUILTIN_TEMPLATES.items()}
    assert render["chatml"] == (f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n  Hi there  <|im_end|>\n"
                                "<|im_start|>assistant\nHello. How can I help?\n<|im_end|>\n"
                                "<|im_start|>user\nTell me a joke.\n\nA short one.<|im_end|>\n<|im_start|>assistant\n")
    assert render["llama2"] == (f"<s>[INST] <<SYS>>\n{sys_text}\n<</SYS>>\n\n  Hi there [/INST] Hello. How can I help? "
                                "</s><s>[INST] Tell me a joke.\n\nA short one. [/INST]")
    assert render["mistral"] == (f"<s>[INST] {sys_text}\n\n  Hi there   [/INST]Hello. How can I help?\n</s>"
                                 "[INST] Tell me a joke.\n\nA short one. [/INST]")
    assert render["llama3"].startswith(f"<s><|start_header_id|>system<|end_header_id|>\n\n{sys_text}<|eot_id|>")
    assert render["llama3"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render["zephyr"].startswith(f"<|system|>\n{sys_text}</s>\n<|user|>\n  Hi there  </s>\n")
    assert render["zephyr"].endswith("<|assistant|>\n")
    assert render["gemma"].startswith(
        f"<s><start_of_turn>user\n{sys_text}\n\nHi there<end_of_turn>\n<start_of_turn>model")
    assert render["phi3"].endswith("<|user|>\nTell me a joke.\n\nA short one.<|end|>\n<|assistant|>\n")
    assert ChatTemplate(BUILTIN_TEMPLATES["phi3"], "<s>", "</s>").render(messages, False).endswith("<|end|>\n</s>")


def test_environment_features(hf_tokenizers):
    """tojson with indent/separators, loop controls, namespace, strftime_now, trim/lstrip blocks,
    raise_exception, as transformers' environment has them."""
    source = (
        "{%- set ns = namespace(n=0) %}\n"
        "{%- for m in messages %}\n"
        "    {%- if loop.index0 == 2 %}{% break %}{% endif %}\n"
        "    {%- if m.role == 'user' %}{% continue %}{% endif %}\n"
        "    {%- set ns.n = ns.n + 1 %}\n"
        "{{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ m | tojson(separators=(',', ':')) }}\n"
        "  {% if true %}\n  kept {{ ns.n }}\n  {% endif %}\n"
        "{%- endfor %}\n"
        "{{ strftime_now('%Y') }}{{ dict(a=1) | tojson }}{{ tools | tojson }}"
    )
    messages = CONVERSATIONS["multi-turn"]
    tools = [{"name": "f", "über": [1, 2.5, None, True]}]
    expected = hf_tokenizers["builtin"].apply_chat_template(messages, tools=tools, tokenize=False, chat_template=source)
    assert ChatTemplate(source).render(messages, add_generation_prompt=False, tools=tools) == expected
    assert "Ünïcödé" in expected and "<b>&</b>" in expected

    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(HalfbyteError, match="roles must alternate"):
        ChatTemplate(failing).render(messages)
    with pytest.raises(HalfbyteError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(messages)
    with pytest.raises(HalfbyteError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")


def test_sandbox_refuses_python_internals():
    messages = CONVERSATIONS["one turn"]
    for source in ("{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                   "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(HalfbyteError):
            ChatTemplate(source).render(messages)


def test_messages_are_checked():
    with pytest.raises(HalfbyteError, match="unknown role 'robot'"):
        normalize_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(HalfbyteError, match="must not be empty"):
        normalize_messages([])
    with pytest.raises(HalfbyteError, match="messages must be a list"):
        normalize_messages("hello")
    with pytest.raises(HalfbyteError, match=r"messages\[0\]: role must be a string"):
        normalize_messages([{"content": "x"}])
    with pytest.raises(HalfbyteError, match="only text content parts"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    text_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = normalize_messages([{"role": "user", "content": text_parts, "name": "bob"}])
    assert parts == [{"role": "user", "content": "a\nb", "name": "bob"}]


@pytest.fixture(scope="module")
def demo_tokenizer() -> Tokenizer:
    with GGUFFile(default_model_path()) as f:
        return Tokenizer.from_metadata(f.metadata)


def test_resolve_template(tmp_path, demo_tokenizer):
    with GGUFFile(default_model_path()) as f:
        metadata = dict(f.metadata)
    fallback = resolve_template(metadata, demo_tokenizer)
    assert fallback.source == BUILTIN_TEMPLATES["chatml"] and "fallback" in fallback.name
    assert (fallback.bos_token, fallback.eos_token) == ("<s>", "</s>")
    assert fallback.stop_texts == ["<|im_end|>", "<|im_start|>"]
    assert resolve_template(metadata, demo_tokenizer, "llama2").source == BUILTIN_TEMPLATES["llama2"]
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", encoding="utf-8")
    assert resolve_template(metadata, demo_tokenizer, str(jinja)).render(CONVERSATIONS["one turn"]) == "[user]Hello!"
    assert resolve_template(metadata, demo_tokenizer, "{{ messages[0].content }}").render(
        CONVERSATIONS["one turn"]) == "Hello!"
    with pytest.raises(HalfbyteError, match="unknown chat template 'nope'"):
        resolve_template(metadata, demo_tokenizer, "nope")
    own = {**metadata, "tokenizer.chat_template": "A{{ messages | length }}",
           "tokenizer.chat_template.tool_use": "B{{ tools | length }}"}
    assert resolve_template(own, demo_tokenizer).render(CONVERSATIONS["system"]) == "A2"
    assert resolve_template(own, demo_tokenizer, "tool_use").render(CONVERSATIONS["system"], tools=[1]) == "B1"
    assert resolve_template(own, demo_tokenizer, "chatml").source == BUILTIN_TEMPLATES["chatml"]


def test_prompt_tokens_single_bos(demo_tokenizer):
    with_bos = prompt_tokens(demo_tokenizer, "<s>[INST] Hi [/INST]")
    without = prompt_tokens(demo_tokenizer, "[INST] Hi [/INST]")
    assert with_bos == without and with_bos.count(demo_tokenizer.bos_id) == 1 and with_bos[0] == demo_tokenizer.bos_id
    assert prompt_tokens(demo_tokenizer, "a</s>b").count(demo_tokenizer.eos_id) == 1  # control text parsed


# -- end of generation ----------------------------------------------------------------------------


def _bpe_metadata(name: str) -> dict:
    """tokenizer.ggml.* for a fixture's tokenizer.json, as the converter writes them."""
    data = json.loads((FIXTURES / name / "tokenizer.json").read_text(encoding="utf-8"))
    config = _config(name)
    vocab = dict(data["model"]["vocab"])
    types = {}
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    tokens = [""] * (max(vocab.values()) + 1)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": {"llama3": "llama-bpe", "qwen": "qwen2"}[name],
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(types.get(i, TokenType.NORMAL)) for i in range(len(tokens))],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": vocab[config["eos_token"]],
        "tokenizer.ggml.bos_token_id": vocab[config["bos_token"] or "<|endoftext|>"],
    }


def test_eog_ids_real_vocabularies():
    llama3 = Tokenizer.from_metadata(_bpe_metadata("llama3"))
    # <|end_of_text|> (EOS), <|eot_id|>, and <|eom_id|> where the vocabulary has it
    expected = {128001, 128009} | ({128008} if llama3.piece(128008) == "<|eom_id|>" else set())
    assert llama3.eog_ids == expected and llama3.is_eog(128009) and not llama3.is_eog(128000)
    qwen = Tokenizer.from_metadata(_bpe_metadata("qwen"))
    assert {qwen.piece(i) for i in qwen.eog_ids} == {"<|im_end|>", "<|endoftext|>"}
    # an explicit tokenizer.ggml.eot_token_id joins the set
    md = {**_bpe_metadata("qwen"), "tokenizer.ggml.eot_token_id": 151644}
    assert 151644 in Tokenizer.from_metadata(md).eog_ids


def test_eog_ids_demo_and_gpt_oss_rule(demo_tokenizer):
    assert demo_tokenizer.eog_ids == {demo_tokenizer.eos_id}
    md = _bpe_metadata("qwen")
    tokens = list(md["tokenizer.ggml.tokens"])
    for i, text in zip((151650, 151651, 151652), ("<|end|>", "<|return|>", "<|call|>")):
        tokens[i] = text
    gpt_oss_like = Tokenizer.from_metadata({**md, "tokenizer.ggml.tokens": tokens})
    assert 151650 not in gpt_oss_like.eog_ids and {151651, 151652} <= gpt_oss_like.eog_ids
    tokens[151651] = "<|x|>"  # without <|return|>, <|end|> ends a generation
    assert 151650 in Tokenizer.from_metadata({**md, "tokenizer.ggml.tokens": tokens}).eog_ids


def test_generate_stops_at_any_eog_token(tmp_path):
    """A token declared as tokenizer.ggml.eot_token_id ends Model.generate like EOS does."""
    from engine.model import Model

    model = Model.load(default_model_path())
    prompt = "And the LORD said unto Moses"
    model.generate(prompt, max_tokens=8, temperature=0)
    greedy = model.last_stats.tokens
    assert len(greedy) == 8 and len(set(greedy)) > 3
    eot = greedy[3]
    first = greedy.index(eot)
    path = write_model_copy(tmp_path / "eot.gguf", {"tokenizer.ggml.eot_token_id": (eot, GGUFValueType.UINT32)})
    with_eot = Model.load(path)
    assert eot in with_eot.tokenizer.eog_ids
    text = with_eot.generate(prompt, max_tokens=8, temperature=0)
    assert with_eot.last_stats.stop_reason == "eos" and with_eot.last_stats.tokens == greedy[:first]
    assert text == model.detokenize(greedy[:first]) or text == " " + model.detokenize(greedy[:first])
    assert np.array_equal(with_eot.tokenize(prompt), model.tokenize(prompt))


# -- library API (llama-cpp-python's shapes) -------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    from engine.model import Model

    return Model.load(default_model_path())


def _check_usage(result: dict) -> None:
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_create_completion_shapes(demo_model):
    prompt = "And the LORD said unto Moses"
    result = demo_model.create_completion(prompt, max_tokens=10, temperature=0, logprobs=2)
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "demo-kjv-q8_0.gguf" and isinstance(result["created"], int)
    (choice,) = result["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(demo_model.tokenize(prompt)), "completion_tokens": 10,
                               "total_tokens": len(demo_model.tokenize(prompt)) + 10}
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == 10
    assert lp["text_offset"][0] == len(prompt)
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)  # greedy: the best one
        assert token in top and logprob <= 0
    # greedy text equals generate()'s, streamed chunks join to it, the last chunk says why it ended
    assert choice["text"] == demo_model.generate(prompt, max_tokens=10, temperature=0)
    chunks = list(demo_model.create_completion(prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1 and "usage" not in chunks[0]
    # stop strings: excluded, finish_reason "stop"
    cut = demo_model.create_completion(prompt, max_tokens=10, temperature=0, stop=[" children"])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert choice["text"].startswith(cut["choices"][0]["text"]) and " children" not in cut["choices"][0]["text"]
    # token-id prompts, seeds
    by_ids = demo_model.create_completion(demo_model.tokenize(prompt), max_tokens=10, temperature=0)
    assert by_ids["choices"][0]["text"] == choice["text"]
    a, b = (demo_model.create_completion(prompt, max_tokens=12, seed=5, cache_prompt=False) for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_create_chat_completion_shapes(demo_model):
    messages = [{"role": "system", "content": "Answer as the KJV."}, {"role": "user", "content": "Who is the LORD?"}]
    result = demo_model.create_chat_completion(messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    (choice,) = result["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    _check_usage(result)
    prompt_text = demo_model.apply_chat_template(messages)
    assert prompt_text == ("<|im_start|>system\nAnswer as the KJV.<|im_end|>\n<|im_start|>user\nWho is the LORD?"
                           "<|im_end|>\n<|im_start|>assistant\n")
    assert result["usage"]["prompt_tokens"] == len(demo_model.tokenize(prompt_text, special=True))
    content = choice["logprobs"]["content"]
    assert "".join(bytes(e["bytes"]).decode() for e in content) == choice["message"]["content"]
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
               for e in content)
    chunks = list(demo_model.create_chat_completion(messages, max_tokens=12, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert joined == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == \
        choice["finish_reason"]


def test_chat_completion_stops_at_turn_end_text(demo_model):
    """The ChatML fallback's <|im_end|> is text for the demo vocabulary: a stop string."""
    messages = [{"role": "user", "content": "Say something."}]
    free = demo_model.create_completion(demo_model.apply_chat_template(messages), max_tokens=24, temperature=0)
    text = free["choices"][0]["text"]
    words = text.split()
    assert len(words) > 4
    # a template whose turn-end text is a word the model writes anyway stops right there
    from engine.chat import ChatTemplate

    saved = demo_model._chat_template
    try:
        demo_model._chat_template = ChatTemplate(BUILTIN_TEMPLATES["chatml"], "<s>", words[2], name="t")
        demo_model._chat_template.source += "{{ eos_token }}"
        result = demo_model.create_chat_completion(messages, max_tokens=24, temperature=0)
    finally:
        demo_model._chat_template = saved
    assert result["choices"][0]["finish_reason"] == "stop"
    assert words[2] not in result["choices"][0]["message"]["content"]


def test_prefix_reuse(demo_model):
    prompt = demo_model.tokenize("And the LORD said unto Moses, Go in unto Pharaoh")
    demo_model.create_completion(prompt, max_tokens=4, temperature=0)
    demo_model.create_completion(prompt + [300, 261], max_tokens=4, temperature=0)
    assert demo_model.last_stats.prompt_tokens == 2  # only the new tokens were evaluated
    demo_model.create_completion(prompt, max_tokens=4, temperature=0)
    assert demo_model.last_stats.prompt_tokens == 1  # the last prompt token again, for its logits
    demo_model.create_completion(prompt, max_tokens=4, temperature=0, cache_prompt=False)
    assert demo_model.last_stats.prompt_tokens == len(prompt)


def test_library_argument_checks(demo_model):
    with pytest.raises(HalfbyteError, match="max_tokens must be >= 1"):
        demo_model.create_completion("x", max_tokens=0)
    with pytest.raises(HalfbyteError, match="temperature must be >= 0"):
        demo_model.create_completion("x", temperature=-1)
    with pytest.raises(HalfbyteError, match="logprobs must be an integer in 0..20"):
        demo_model.create_completion("x", logprobs=99)
    with pytest.raises(HalfbyteError, match="does not fit in the context"):
        demo_model.create_completion([1] * demo_model.n_ctx)
    with pytest.raises(HalfbyteError, match="unknown role"):
        demo_model.create_chat_completion([{"role": "wizard", "content": "x"}])
    with pytest.raises(HalfbyteError, match="top_logprobs needs logprobs"):
        demo_model.create_chat_completion([{"role": "user", "content": "x"}], top_logprobs=2)


def test_info_shows_chat_template_and_eog(tmp_path):
    from engine.describe import describe

    source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = write_model_copy(tmp_path / "t.gguf", {
        "tokenizer.chat_template": (source, GGUFValueType.STRING),
        "tokenizer.chat_template.rag": ("{{ 'rag' }}", GGUFValueType.STRING),
    })
    with GGUFFile(path) as f:
        report = describe(f)
    assert f"chat template: {len(source)} chars, first line '{{% for m in messages %}}<|im_start|>{{{{ m.role }}}}'" \
        in report
    assert "chat template 'rag': 11 chars" in report
    assert "end of generation: 2 '</s>'" in report
    with GGUFFile(default_model_path()) as f:
        assert "chat template: <none> (chat uses ChatML, as llama.cpp)" in describe(f)
    from engine.model import Model

    model = Model.load(path)
    assert model.chat_template.source == source and model.chat_template.name == "file"
    assert Model.load(path, chat_template="rag").apply_chat_template([{"role": "user", "content": "x"}]) == "rag"
    with pytest.raises(HalfbyteError, match="unknown chat template"):
        Model.load(path, chat_template="nope")
