"""Target selection: name patterns × layer selections, and the errors that list what exists."""

from __future__ import annotations

import pytest
from torch import nn

from ftlab.peft import LoRA, TargetError
from ftlab.peft.targets import find_targets, layer_index, matches, module_patterns, num_layers, select_layers

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_names(layers, projs):
    """Full module names in tiny-llama (4 blocks) for ``projs`` in ``layers``."""
    return sorted(
        f"model.layers.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}" for i in layers for p in projs
    )


def chosen(model, targets, layers=None, kinds=(nn.Linear,)):
    return sorted(name for name, _ in find_targets(model, targets, layers, kinds))


# ------------------------------------------------------------------------------- name patterns
@pytest.mark.parametrize(
    "name, target, expected",
    [
        ("model.layers.0.self_attn.q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", "proj", False),  # a plain name is a whole component
        ("model.layers.0.self_attn.qq_proj", "q_proj", False),
        ("q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "mlp.q_proj", False),
        ("model.layers.0.self_attn.q_proj", "self_attn.*", True),
        ("model.layers.0.mlp.gate_proj", "mlp.*_proj", True),
        ("model.layers.0.self_attn.q_proj", "mlp.*_proj", False),
        ("model.layers.0.self_attn.q_proj", "?_proj", True),
        ("transformer.h.1.attn.c_attn", "attn.c_*", True),
        ("model.layers.3.self_attn.v_proj", r"re:model\.layers\.[23]\.self_attn\.v_proj", True),
        ("model.layers.1.self_attn.v_proj", r"re:model\.layers\.[23]\.self_attn\.v_proj", False),
        ("model.layers.3.self_attn.v_proj", r"re:v_proj", False),  # regex is a full match
        ("model.layers.3.self_attn.v_proj", r"re:.*v_proj", True),
    ],
)
def test_matches(name, target, expected):
    assert matches(name, target) is expected


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("q_proj", llama_names(range(4), ["q_proj"])),
        (["q_proj", "v_proj"], llama_names(range(4), ["q_proj", "v_proj"])),
        (["self_attn.o_proj"], llama_names(range(4), ["o_proj"])),
        (["self_attn.*"], llama_names(range(4), ATTN)),
        (["mlp.*_proj"], llama_names(range(4), MLP)),
        ([r"re:model\.layers\.[02]\.mlp\.(up|down)_proj"], llama_names([0, 2], ["up_proj", "down_proj"])),
        (["all-linear"], llama_names(range(4), ATTN + MLP)),
    ],
)
def test_find_targets_patterns(tiny_llama, targets, expected):
    assert chosen(tiny_llama, targets) == expected


def test_all_linear_excludes_lm_head(tiny_llama, tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    llama = chosen(tiny_llama, "all-linear")
    assert len(llama) == 4 * 7 and "lm_head" not in llama
    # GPT-2's projections are Conv1D; its lm_head is an nn.Linear outside the blocks.
    gpt2 = chosen(tiny_gpt2, "all-linear", kinds=(nn.Linear, Conv1D))
    assert gpt2 == sorted(
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert "lm_head" in chosen(tiny_gpt2, "lm_head")  # it exists, all-linear just skips it


def test_gpt2_plain_name_matches_both_c_proj(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    kinds = (Conv1D,)
    assert chosen(tiny_gpt2, "c_proj", kinds=kinds) == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    assert chosen(tiny_gpt2, "mlp.c_proj", kinds=kinds) == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]


def test_bert_query_value(tiny_bert):
    assert chosen(tiny_bert, ["query", "value"]) == [
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]
    # all-linear keeps the blocks' 6 linears and skips the pooler, which sits outside them
    linear = chosen(tiny_bert, "all-linear")
    assert len(linear) == 2 * 6 and "pooler.dense" not in linear


# ------------------------------------------------------------------------------- layer selections
@pytest.mark.parametrize(
    "selection, expected",
    [
        (None, {0, 1, 2, 3}),
        ("all", {0, 1, 2, 3}),
        ([0, 2], {0, 2}),
        ([-1], {3}),
        ([-4, 1], {0, 1}),
        ((3,), {3}),
        ("1-2", {1, 2}),
        ("0 - 3", {0, 1, 2, 3}),
        ("2-2", {2}),
        ("-2--1", {2, 3}),
        ("top:1", {3}),
        ("top:3", {1, 2, 3}),
        ("bottom:2", {0, 1}),
        ("bottom:4", {0, 1, 2, 3}),
        ("top_half", {2, 3}),
        ("bottom_half", {0, 1}),
    ],
)
def test_select_layers(selection, expected):
    assert select_layers(selection, 4) == expected


@pytest.mark.parametrize(
    "layers, expected_layers",
    [
        ([1], [1]),
        ([-1], [3]),
        ("0-1", [0, 1]),
        ("top:2", [2, 3]),
        ("bottom:1", [0]),
        ("top_half", [2, 3]),
        ("bottom_half", [0, 1]),
    ],
)
def test_find_targets_with_layers(tiny_llama, layers, expected_layers):
    expected = llama_names(expected_layers, ["q_proj", "v_proj"])
    assert chosen(tiny_llama, ["q_proj", "v_proj"], layers) == expected


def test_layers_exclude_modules_outside_blocks(tiny_llama):
    # lm_head matches by name but belongs to no block, so any layer selection drops it
    assert chosen(tiny_llama, "lm_head") == ["lm_head"]
    with pytest.raises(TargetError):
        find_targets(tiny_llama, "lm_head", layers="top:1")


def test_layer_helpers(tiny_llama, tiny_gpt2, tiny_bert):
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.12.attn") == 12
    assert layer_index("encoder.layer.1.attention.self.query") == 1
    assert layer_index("model.layers.10") == 10
    assert layer_index("lm_head") is None
    assert layer_index("model.layers_extra.3.x") is None
    assert (num_layers(tiny_llama), num_layers(tiny_gpt2), num_layers(tiny_bert)) == (4, 2, 2)
    named = [(f"model.layers.{i}.self_attn.q_proj", None) for i in range(3)] + [("lm_head", None)]
    assert module_patterns(named) == ["model.layers.*.self_attn.q_proj", "lm_head"]


def test_num_layers_from_names_without_config():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert num_layers(model) == 3
    with pytest.raises(TargetError, match="cannot find transformer blocks"):
        num_layers(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------- errors
def test_no_match_lists_candidates(tiny_llama):
    with pytest.raises(TargetError) as err:
        find_targets(tiny_llama, ["qkv_proj"])
    msg = str(err.value)
    assert "qkv_proj" in msg and "match no module" in msg
    for name in ("model.layers.*.self_attn.q_proj", "model.layers.*.mlp.down_proj", "lm_head"):
        assert name in msg
    # block indices are folded, so the list stays short whatever the depth
    assert "model.layers.0." not in msg


def test_no_match_through_lora_apply(tiny_gpt2):
    with pytest.raises(TargetError) as err:
        LoRA(targets=["q_proj", "v_proj"]).apply(tiny_gpt2)
    assert "transformer.h.*.attn.c_attn" in str(err.value)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([4], "layer index 4 out of range"),
        ([-5], "layer index -5 out of range"),
        ([0, 7], "out of range"),
        ("2-9", "out of range"),
        ("3-1", "is empty"),
        ("top:0", "k must be in 1..4"),
        ("bottom:5", "k must be in 1..4"),
        ("middle", "not understood"),
        ([], "empty list"),
    ],
)
def test_bad_layer_selection(tiny_llama, layers, message):
    with pytest.raises(TargetError, match=message):
        find_targets(tiny_llama, ["q_proj"], layers)


def test_empty_target_list(tiny_llama):
    with pytest.raises(TargetError, match="no target modules given"):
        find_targets(tiny_llama, [])
    with pytest.raises(TargetError):
        LoRA(targets=[]).apply(tiny_llama)


def test_target_error_is_value_error():
    # so jsonargparse/CLI handlers that catch ValueError report it as a bad argument
    assert issubclass(TargetError, ValueError)


@pytest.mark.parametrize("name, n_blocks", [("tiny-llama", 4), ("tiny-gpt2", 2)])
def test_bare_trunk_blocks_at_root(name, n_blocks):
    """``Backbone.load("encoder")`` gives a bare trunk: its blocks sit at the root (``layers.N``, ``h.N``)."""
    import torch

    from ftlab.models.backbone import Backbone
    from ftlab.peft.layers import linear_kinds

    torch.manual_seed(0)
    trunk = Backbone(name, pretrained=False).load("encoder")
    assert layer_index("layers.2.mlp.up_proj") == 2 and layer_index("h.0.attn.c_attn") == 0
    found = find_targets(trunk, "all-linear", kinds=linear_kinds())
    assert len(found) == n_blocks * (7 if name == "tiny-llama" else 4)
    top = find_targets(trunk, "all-linear", layers="top:1", kinds=linear_kinds())
    assert {layer_index(n) for n, _ in top} == {n_blocks - 1}
