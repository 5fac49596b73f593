"""LongLoRA beyond the invariant table: S²-Attn against full attention, the shift pattern by hand,
causality, padding, errors, eval = full attention, what trains.

Which keys a query sees is read off the output: with ``q = k = 0`` every allowed key gets the same
positive weight, and with ``v = I`` (one-hot per position) output row ``i`` is nonzero exactly at
the keys that query ``i`` attends to. With random ``q``, ``k`` the weights are still all positive.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftlab.peft import LongLoRA, count_parameters
from ftlab.peft.longlora import NAME, shifted_sparse_attention


def pattern(T: int, G: int, H: int = 2, shift: bool = True, random_qk: bool = False) -> torch.Tensor:
    """(H, T, T) 0/1: entry [h, i, j] is 1 when query i of head h attends to key j."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, 4, generator=gen) if random_qk else torch.zeros(1, H, T, 4)
    k = torch.randn(1, H, T, 4, generator=gen) if random_qk else torch.zeros(1, H, T, 4)
    v = torch.eye(T).expand(1, H, T, T)
    return (shifted_sparse_attention(q, k, v, G, shift=shift)[0] > 0).int()


def blocks(T: int, bounds: list[int]) -> torch.Tensor:
    """Causal attention within [bounds[0], bounds[1]), [bounds[1], bounds[2]), ... as a (T, T) 0/1 matrix."""
    m = torch.zeros(T, T, dtype=torch.int)
    for a, b in zip(bounds, bounds[1:]):
        m[a:b, a:b] = torch.tril(torch.ones(b - a, b - a, dtype=torch.int))
    return m


# ------------------------------------------------------------------------------ the attention function
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_one_group_without_shift_is_full_causal_attention(dtype, atol):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=gen).to(dtype) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, 32, shift=False), full, atol=atol, rtol=0)


def test_shift_pattern_by_hand():
    """T = 8, G = 4, two heads: head 0 groups {0-3}, {4-7}; head 1 (shifted by 2) {0,1}, {2-5}, {6,7}."""
    expected_plain = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.int,
    )
    expected_shifted = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.int,
    )
    got = pattern(8, 4)
    assert torch.equal(got[0], expected_plain)
    assert torch.equal(got[1], expected_shifted)
    # each query sees the same number of keys with random scores (no weight is exactly zero)
    assert torch.equal(pattern(8, 4, random_qk=True), got)
    # without shift both heads use the plain groups
    assert torch.equal(pattern(8, 4, shift=False), torch.stack([expected_plain, expected_plain]))


def test_padding_to_a_multiple_of_the_group():
    """T = 10, G = 4: padded to 12 inside; plain groups {0-3}, {4-7}, {8,9}; shifted {0,1}, {2-5}, {6-9}."""
    got = pattern(10, 4)
    assert torch.equal(got[0], blocks(10, [0, 4, 8, 10]))
    assert torch.equal(got[1], blocks(10, [0, 2, 6, 10]))


@pytest.mark.parametrize("T, G, H", [(8, 2, 2), (16, 8, 4), (33, 8, 3), (12, 12, 2), (64, 16, 8)])
def test_causality_no_token_sees_a_later_one(T, G, H):
    got = pattern(T, G, H=H, random_qk=True)
    assert torch.equal(torch.triu(got, diagonal=1), torch.zeros_like(got))
    assert torch.equal(torch.diagonal(got, dim1=1, dim2=2), torch.ones(H, T, dtype=torch.int))  # sees itself
    assert got.sum(-1).max() <= G  # never more than a group
    # the shifted half of the heads (the last H // 2) straddles the plain group boundaries
    if T >= 2 * G:
        assert got[-1, G, G - 1] == 1 and got[0, G, G - 1] == 0


def test_mask_from_transformers_is_respected():
    """A boolean (B, 1, T, T) mask (True = attend), as SDPA's mask function makes for padded batches."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=gen) for _ in range(3))
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    mask = causal.expand(2, 1, 12, 12).clone()
    mask[1, :, :, 3] = False  # batch row 1 must not look at key 3
    out = shifted_sparse_attention(q, k, v, 4, attention_mask=mask)
    torch.testing.assert_close(out[0], shifted_sparse_attention(q[:1], k[:1], v[:1], 4)[0])
    v2 = v.clone()
    v2[1, :, 3] += 100.0
    torch.testing.assert_close(shifted_sparse_attention(q, k, v2, 4, attention_mask=mask)[1], out[1])
    # an additive float mask gives the same result, padded to a multiple of the group or not
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, 4, attention_mask=additive), out)
    out10 = shifted_sparse_attention(
        q[..., :10, :], k[..., :10, :], v[..., :10, :], 4, attention_mask=mask[..., :10, :10]
    )
    torch.testing.assert_close(
        out10,
        shifted_sparse_attention(
            q[..., :10, :], k[..., :10, :], v[..., :10, :], 4, attention_mask=additive[..., :10, :10]
        ),
    )


def test_group_larger_than_sequence_is_an_error():
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="group_size 16 is larger than the sequence"):
        shifted_sparse_attention(q, q, q, 16)


def test_length_not_a_multiple_without_padding_is_an_error():
    q = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        shifted_sparse_attention(q, q, q, 4, pad_to_group=False)


# ------------------------------------------------------------------------------ the method on tiny-llama
def logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


def perturb(model, std=0.05, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def test_registered_and_eval_is_full_attention(make_model, make_batch):
    model = make_model("tiny-llama")
    ids = make_batch(model, length=40)
    with torch.no_grad():
        base = logits(model, ids)
    LongLoRA(group_size=16).apply(model)
    assert model.config._attn_implementation == NAME
    with torch.no_grad():
        assert torch.equal(logits(model, ids), base)  # eval: full attention, zero-init adapter
        model.train()
        trained = logits(model, ids)
    assert (trained - base).abs().max() > 1e-3  # training mode: sparse attention differs
    # generation (eval, with a cache) runs on full attention
    model.eval()
    out = model.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert out.shape == (1, 12)


def test_group_equal_to_sequence_without_shift_matches_base_in_training(make_model, make_batch):
    model = make_model("tiny-llama")
    ids = make_batch(model, length=32)
    model.train()
    with torch.no_grad():
        base = logits(model, ids)
    LongLoRA(group_size=32, shift=False).apply(model)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-5)


def test_model_causality_and_right_padding_in_training(make_model, make_batch):
    model = make_model("tiny-llama")
    LongLoRA(group_size=8).apply(model)
    perturb(model)
    model.train()
    ids = make_batch(model, length=30)
    with torch.no_grad():
        out = logits(model, ids)
        later = ids.clone()
        later[:, 20:] = (later[:, 20:] + 7) % 256
        assert torch.equal(logits(model, later)[:, :20], out[:, :20])  # no token sees a later one
        mask = torch.ones_like(ids)
        mask[1, 25:] = 0  # right padding: real tokens give the same logits
        torch.testing.assert_close(logits(model, ids, mask)[:, :25], out[:, :25], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "train_embeddings, train_norms", [(True, True), (False, True), (True, False), (False, False)]
)
def test_what_trains_and_gets_gradients(make_model, make_batch, train_embeddings, train_norms):
    model = make_model("tiny-llama")
    method = LongLoRA(rank=4, group_size=8, train_embeddings=train_embeddings, train_norms=train_norms)
    method.apply(model)
    perturb(model)
    model.train()
    logits(model, make_batch(model, length=24)).pow(2).mean().backward()
    expected = 4 * 4 * 4 * (128 + 128) + train_embeddings * 259 * 128 + train_norms * (2 * 4 * 128 + 128)
    assert method.num_parameters(model) == count_parameters(model)[0] == expected
    for n, p in model.named_parameters():
        assert p.requires_grad == (
            "lora_" in n or (train_embeddings and "embed_tokens" in n) or (train_norms and "norm" in n)
        ), n
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n


def test_training_step_lowers_loss(make_model, make_batch):
    model = make_model("tiny-llama")
    LongLoRA(rank=8, group_size=8).apply(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = make_batch(model, length=36)  # padded to 40 inside attention
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_group_larger_than_training_sequence_is_an_error(make_model, make_batch):
    model = make_model("tiny-llama")
    LongLoRA(group_size=64).apply(model)
    model.train()
    with pytest.raises(ValueError, match="group_size 64 is larger than the sequence"):
        logits(model, make_batch(model, length=20))


def test_encoder_without_causal_attention_is_an_error(make_model):
    with pytest.raises(ValueError, match="LongLoRA"):
        LongLoRA(targets=["query", "value"], group_size=4).apply(make_model("tiny-bert"))


@pytest.mark.parametrize("group_size", [0, 1, -4])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        LongLoRA(group_size=group_size)
