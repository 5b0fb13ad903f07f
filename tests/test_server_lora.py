"""Run-time LoRA adapters in `halfbyte serve`, as llama-server: loaded at start (``--lora``,
``--lora-scaled``, ``--lora-init-without-apply``), listed and set by ``GET/POST /lora-adapters``, and
scaled per request by the ``"lora": [{"id", "scale"}]`` field (adapters not named: scale 0).

The reference for every answer is the same request through an in-process ``Model`` loaded with the
adapter at that scale (a request runs alone in its forward pass, so the text is identical)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from gguf import GGMLQuantizationType
from tiny_models import build_model, llama_config, save_checkpoint

pytest.importorskip("uvicorn")
peft = pytest.importorskip("peft")
httpx = pytest.importorskip("httpx")

from test_server import TIMEOUT, RunningServer  # noqa: E402

from converters.convert import convert, convert_adapter  # noqa: E402
from engine.model import Model  # noqa: E402

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("server-lora")
    save_checkpoint(build_model(llama_config(), seed=3), root / "hf", "llama")
    base = convert(str(root / "hf"), root / "base.gguf", GGMLQuantizationType.F32, progress=False)
    torch.manual_seed(21)
    adapted = get_peft_model(build_model(llama_config(), seed=3),
                             LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    adapted.save_pretrained(root / "adapter")
    adapter = convert_adapter(root / "adapter", str(root / "hf"), root / "adapter.gguf", GGMLQuantizationType.F32,
                              progress=False)
    return base, adapter


def reference(files, scale: float) -> str:
    base, adapter = files
    model = Model.load(base, threads=1, lora=[(adapter, scale)] if scale else ())
    return model.create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]


@pytest.fixture(scope="module")
def server(files):
    base, adapter = files
    running = RunningServer(Model.load(base, threads=1, lora=[(adapter, 1.0)]), n_slots=4)
    yield running
    running.close()


def complete(server, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                      json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields})


def test_adapters_listed_and_applied_per_request(server, files):
    listed = httpx.get(f"{server.url}/lora-adapters", timeout=TIMEOUT).json()
    assert listed == [{"id": 0, "path": str(files[1]), "scale": 1.0}]
    texts = {scale: reference(files, scale) for scale in (0.0, 0.5, 1.0)}
    assert len(set(texts.values())) == 3  # the scale changes the text: what follows can fail
    assert complete(server).json()["choices"][0]["text"] == texts[1.0]
    assert complete(server, lora=[{"id": 0, "scale": 0.5}]).json()["choices"][0]["text"] == texts[0.5]
    assert complete(server, lora=[]).json()["choices"][0]["text"] == texts[0.0]  # not named: scale 0
    # Requests with different scales at once: each gets its own forward pass, none takes another's scale.
    with ThreadPoolExecutor(6) as pool:
        futures = {pool.submit(complete, server, lora=[{"id": 0, "scale": s}]): s for s in (0.0, 0.5, 1.0) * 2}
        for future, scale in futures.items():
            assert future.result().json()["choices"][0]["text"] == texts[scale], scale


def test_post_sets_the_default_scales(server, files):
    try:
        answer = httpx.post(f"{server.url}/lora-adapters", json=[{"id": 0, "scale": 0.5}], timeout=TIMEOUT)
        assert answer.json()[0]["scale"] == 0.5
        assert complete(server).json()["choices"][0]["text"] == reference(files, 0.5)
    finally:
        httpx.post(f"{server.url}/lora-adapters", json=[{"id": 0, "scale": 1.0}], timeout=TIMEOUT)


@pytest.mark.parametrize("value, message", [
    ([{"id": 3, "scale": 1.0}], "no adapter with id 3"),
    ({"id": 0}, "must be a list"),
    ([{"id": 0, "scale": "big"}], "each entry must be"),
])
def test_bad_lora_fields_are_400(server, value, message):
    answer = complete(server, lora=value)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_cli_options_checked():
    from click.testing import CliRunner

    from engine.cli import main

    result = CliRunner().invoke(main, ["serve", "--lora-init-without-apply"])
    assert result.exit_code == 1 and "--lora-init-without-apply needs --lora" in result.output
    result = CliRunner().invoke(main, ["serve", "--pipeline", "2"])
    assert result.exit_code == 1 and "--pipeline needs --ray" in result.output
    result = CliRunner().invoke(main, ["serve", "--ray", "--pipeline", "2", "--replicas", "2"])
    assert result.exit_code == 1 and "does not go with --replicas" in result.output
