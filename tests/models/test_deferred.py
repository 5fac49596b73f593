"""Low-memory loading: built empty, filled from the checkpoint, the same as a plain load; methods
that need the base weights to start are caught and load whole."""

import logging

import pytest
import torch
import torch.distributed as dist

from ftlab.models.backbone import Backbone
from ftlab.models.tokenizer import byte_tokenizer
from ftlab.objectives import CausalLM
from ftlab.peft import DoRA, LoRA, PromptTuning, QLoRA


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    Backbone(pretrained=False).load("causal_lm").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind,extra", [("causal_lm", {}), ("sequence_classification", {"num_labels": 3})])
def test_an_empty_build_filled_from_the_checkpoint_is_from_pretrained(checkpoint, kind, extra):
    torch.manual_seed(0)
    plain = Backbone(checkpoint).load(kind, **extra)
    draw_after_plain = torch.rand(3)
    torch.manual_seed(0)
    backbone = Backbone(checkpoint)
    with backbone.empty_for_sharding():
        empty = backbone.load(kind, **extra)
    assert torch.equal(torch.rand(3), draw_after_plain)  # same random draws: a new head starts the same
    placeholders = backbone.placeholders
    assert len(placeholders.sources) == 38  # every tensor of the checkpoint (tied head: one)
    assert all(p.untyped_storage().nbytes() == p.element_size() for p, _, _ in placeholders.sources.values())
    assert placeholders.check(empty) is None
    placeholders.to_meta(empty)
    assert placeholders.fill(empty, torch.device("cpu")) == 38
    mine, theirs = empty.state_dict(), plain.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with Backbone(checkpoint).empty_for_sharding():  # outside the block: a plain load again
        pass
    assert Backbone(checkpoint).load(kind, **extra) is not None


@pytest.mark.parametrize(
    "method,why",
    [
        (lambda: LoRA(rank=2), None),
        (lambda: QLoRA(rank=2), "replaced"),  # quantizes the base weights
        (lambda: DoRA(rank=2), "computed"),  # magnitudes = column norms of the base weights
        (lambda: PromptTuning(num_virtual_tokens=2, init="vocab"), "computed"),  # rows of the embedding table
        (lambda: LoRA(rank=2, init="pissa"), "error"),  # an SVD of the base weights
    ],
)
def test_a_method_that_reads_the_base_weights_is_caught(checkpoint, method, why):
    backbone = Backbone(checkpoint)
    with backbone.empty_for_sharding():
        model = backbone.load("causal_lm")
    try:
        method().apply(model)
    except RuntimeError:
        assert why == "error"
        return
    reason = backbone.placeholders.check(model)
    assert (reason is None) if why is None else (why in reason)


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-process gloo group and its mesh: FSDP2 in this process (a file store: no port to collide on)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_configure_model_fills_shards_or_loads_whole_with_the_same_start(checkpoint, one_rank_mesh, caplog):
    from torch.distributed.tensor import DTensor

    def build(method, mesh):
        torch.manual_seed(0)
        module = CausalLM(Backbone(checkpoint), method, exact_match=False)
        module._device_mesh = mesh
        module.configure_model()
        params = module.named_parameters()
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in params}

    for method, path in (
        (lambda: LoRA(rank=2, init="gaussian"), "read its shard of 38 tensors"),
        (lambda: DoRA(rank=2), "loads " + checkpoint + " whole"),
    ):
        with caplog.at_level(logging.INFO, logger="ftlab"):
            caplog.clear()
            sharded = build(method(), one_rank_mesh)
        assert path in caplog.text
        plain = build(method(), None)
        assert sharded.keys() == plain.keys() and all(torch.equal(sharded[k], plain[k]) for k in plain)
