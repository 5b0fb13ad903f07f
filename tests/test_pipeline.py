"""A model split into pipeline stages on Ray (engine/distributed/pipeline.py), on a local two-node
Ray cluster (``ray.cluster_utils.Cluster``: each node its own raylet, as two machines would be).

The reference is one process running the same file: logits must be bit-identical, not close,
because every stage runs the architecture's own layer code in the same order."""

from __future__ import annotations

import numpy as np
import pytest

from engine.distributed.pipeline import chunk_sizes, split_layers
from engine.errors import HalfbyteError


def test_split_layers_is_contiguous_and_even():
    assert split_layers(6, 2) == [range(0, 3), range(3, 6)]
    assert split_layers(22, 4) == [range(0, 6), range(6, 12), range(12, 17), range(17, 22)]
    assert split_layers(5, 1) == [range(0, 5)]
    for bad in (0, 7):
        with pytest.raises(HalfbyteError, match="cannot split 6 layers"):
            split_layers(6, bad)


def test_chunk_sizes_are_near_equal():
    assert chunk_sizes(10, 32) == [10]
    assert chunk_sizes(33, 32) == [17, 16]  # never 32 + a 1-token tail (the one-row kernels)
    assert chunk_sizes(100, 32) == [25, 25, 25, 25]
    assert chunk_sizes(100, 0) == [100]
    for n in range(1, 200):
        sizes = chunk_sizes(n, 16)
        assert sum(sizes) == n and max(sizes) <= max(16, n if n <= 16 else 16) and max(sizes) - min(sizes) <= 1
        assert len(sizes) == 1 or min(sizes) >= 8


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from engine.distributed.ray_runtime import loopback_ray

    with loopback_ray():  # every node's processes on 127.0.0.1
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        nodes.add_node(num_cpus=1)
        ray.init(address=nodes.address, namespace="halfbyte-tests", log_to_driver=False)
        nodes.wait_for_nodes()
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def demo_path():
    from engine.default_model import default_model_path

    return str(default_model_path())


PROMPT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
          "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")


@pytest.mark.slow
def test_two_stages_on_two_nodes_equal_one_process(cluster, demo_path):
    from engine.distributed.pipeline import PipelineModel
    from engine.model import Model

    local = Model.load(demo_path, n_ctx=256)
    with PipelineModel.load(demo_path, stages=2, n_ctx=256, micro_batch=16) as piped:
        where = piped.stages()
        assert [w["layers"] for w in where] == [(0, 3), (3, 6)]
        assert where[0]["node_id"] != where[1]["node_id"]  # strict-spread: one stage per node
        ids = local.tokenize(PROMPT)
        assert len(ids) > 2 * 16  # the prompt goes through in several micro-batches
        expected = local.eval(ids)
        got = piped.eval(ids)
        assert np.array_equal(got, expected), np.abs(got - expected).max()
        # Token by token after that prompt: same logits at every step.
        for token in local.tokenize(" And God said", add_bos=False):
            assert np.array_equal(piped.eval([token]), local.eval([token]))
        # Generation (a new prompt: the common prefix with the context is kept, as in one process).
        text = local.generate("And God saw the light", max_tokens=24, temperature=0)
        assert piped.generate("And God saw the light", max_tokens=24, temperature=0) == text
        # Two sequences in one batch (a server step): each sequence's cache lives on the stages.
        from engine.batch import Batch, SequenceSlice

        a, b = local.tokenize("Let there be light"), local.tokenize("the waters under the heaven", add_bos=False)

        def two(model):
            caches = [model.new_cache(64), model.new_cache(64)]
            return model.arch.forward(Batch(a + b, [SequenceSlice(caches[0], 0, len(a)),
                                                    SequenceSlice(caches[1], 0, len(b))]), all_logits=True)

        assert np.array_equal(two(piped), two(local))
        # Embeddings use scratch caches (released on the stages with their handles).
        assert piped.embed(["the deep", "the waters"]) == local.embed(["the deep", "the waters"])
        with pytest.raises(HalfbyteError, match="not supported on a pipeline"):
            piped.save_state()


@pytest.mark.slow
def test_server_scheduler_runs_on_a_pipeline(cluster, demo_path):
    from engine.distributed.pipeline import PipelineModel
    from engine.model import Model
    from engine.serving.completion import SequenceState, Settings
    from engine.serving.scheduler import Job, Scheduler

    def complete(model) -> str:
        scheduler = Scheduler(model, n_slots=2, n_ctx=128).start()
        try:
            import queue

            events: queue.Queue = queue.Queue()
            settings = Settings.build(24, 0.0, 1.0, 0, 0.0, 1.0, 64, None, 0, None, 0.0, 0.0)
            ids = model.tokenize("And the evening and the morning were")
            scheduler.submit(Job(SequenceState(model.tokenizer, ids, settings, 128), events.put))
            pieces = []
            while True:
                event = events.get(timeout=120)
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    return "".join(pieces)
                else:
                    raise AssertionError(event)
        finally:
            scheduler.stop()

    expected = complete(Model.load(demo_path, n_ctx=128))
    with PipelineModel.load(demo_path, stages=2, n_ctx=128) as piped:
        assert complete(piped) == expected


@pytest.mark.slow
def test_each_stage_maps_about_its_share_of_the_weights(cluster, tmp_path):
    from converters.synthetic import LlamaShape, write_synthetic
    from engine.distributed.pipeline import PipelineModel

    path = write_synthetic(tmp_path / "eight-layers.gguf", LlamaShape(2000, 512, 8, 8, 8, 1536, 128), "q4_0")
    size = path.stat().st_size
    with PipelineModel.load(path, stages=2, n_ctx=64) as piped:
        piped.eval(piped.tokenize("a few words to run every layer once"))
        memory = piped.stage_memory()
    assert [m["layers"] for m in memory] == [(0, 4), (4, 8)]
    for m in memory:  # half the layers each, plus the embedding rows it read or the head
        assert 0.40 * size < m["mapped"] < 0.62 * size, (m, size)


@pytest.mark.slow
def test_placement_that_cannot_be_met_is_one_clean_error(cluster, demo_path):
    from engine.distributed.pipeline import PipelineModel

    with pytest.raises(HalfbyteError, match=r"cannot place 3 pipeline stages .* 2 node\(s\).*--placement spread"):
        PipelineModel.load(demo_path, stages=3, ready_timeout=5)
    with pytest.raises(HalfbyteError, match="cannot split 6 layers into 7 stages"):
        PipelineModel.load(demo_path, stages=7)
    with pytest.raises(HalfbyteError, match="no-such.gguf"):
        PipelineModel.load("/nonexistent/no-such.gguf", stages=2)


@pytest.mark.slow
def test_serve_on_a_pipeline(cluster, demo_path):
    """`halfbyte serve --ray --pipeline 2`'s service: the OpenAI endpoints on a pipelined model give the
    text one process gives."""
    from starlette.testclient import TestClient

    from engine.model import Model
    from engine.server import build_service, create_app

    service = build_service(demo_path, 128, None, 2, None, None,
                            pipeline={"stages": 2, "placement": "strict-spread", "micro_batch": 16})
    try:
        with TestClient(create_app(service)) as client:
            answer = client.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 16,
                                                          "temperature": 0}).json()
        expected = Model.load(demo_path, n_ctx=128).create_completion("And God said", max_tokens=16, temperature=0)
        assert answer["choices"][0]["text"] == expected["choices"][0]["text"]
    finally:
        service.scheduler.stop()
        service.model.close()
