"""CausalLM on packed rows and with the chunked loss: the same numbers as padded batches and plain logits."""

import logging
from functools import partial

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ftlab.data import InstructionData
from ftlab.data.packing import collate_packed
from ftlab.losses.lm import IGNORE, count_targets
from ftlab.models.backbone import Backbone
from ftlab.models.lm_head import OutputHead
from ftlab.objectives import CausalLM, Seq2SeqLM
from ftlab.peft import Full, LongLoRA, LoRA, PromptTuning


@pytest.fixture(scope="module")
def rows():
    """Synthetic instruction samples packed into rows of 192 tokens (about two per row)."""
    dm = InstructionData(
        template="alpaca_short",
        max_length=192,
        batch_size=4,
        synthetic_train_size=10,
        synthetic_val_size=2,
        packing=True,
    )
    dm.setup("fit")
    return dm, dm.splits["train"]


def _objective(method=None, attn: str | None = None, **kw) -> CausalLM:
    torch.manual_seed(0)
    backbone = Backbone(pretrained=False, attn_implementation=attn)
    model = CausalLM(backbone, method or Full(), exact_match=False, **kw)
    model.configure_model()
    return model.eval()  # no dropout: two forwards must agree


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_grads(model, batch):
    model.zero_grad()
    packed = "position_ids" in batch
    total = model(
        batch["input_ids"],
        None if packed else batch["attention_mask"],
        batch.get("position_ids"),
        labels=batch["labels"],
    )
    total.backward()
    return total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunked,attn", [(True, "sdpa"), (False, "sdpa"), (True, "eager")])
def test_packed_rows_give_the_padded_batch_loss_and_gradients(rows, chunked, attn):
    dm, packed_rows = rows
    model = _objective(attn=attn, chunked_loss=chunked)
    packed = collate_packed(packed_rows, dm.tokenizer.pad_token_id)
    padded = dm.collate([it for row in packed_rows for it in row], "train")
    assert packed["input_ids"].size(0) < padded["input_ids"].size(0)  # several samples per row
    loss_p, grads_p = _loss_and_grads(model, packed)
    loss_u, grads_u = _loss_and_grads(model, padded)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 30
    for name in grads_u:  # summation order differs between layouts: compare each tensor as a whole
        assert _gap(grads_p[name], grads_u[name]) <= 1e-5, name


def test_a_samples_loss_does_not_reach_another_sample_in_the_same_row(rows):
    dm, packed_rows = rows
    row = next(r for r in packed_rows if len(r) >= 2)
    batch = collate_packed([row], dm.tokenizer.pad_token_id)
    first = len(row[0]["input_ids"])
    labels = batch["labels"].clone()
    labels[:, :first] = IGNORE  # the loss of the second sample (and any after it) only
    objective = _objective()
    caught = []

    def keep(module, args, out):  # the embeddings of the row, whose gradient we read
        out.retain_grad()
        caught.append(out)

    objective.model.get_input_embeddings().register_forward_hook(keep)
    objective(batch["input_ids"], None, batch["position_ids"], labels=labels).backward()
    grad = caught[0].grad  # (1, L, H)
    assert grad[0, :first].abs().max() == 0  # exactly: the block-causal mask cuts the first sample off
    second = len(row[1]["input_ids"]) - 1  # its last token predicts nothing
    assert grad[0, first : first + second].abs().sum(-1).min() > 0


COMMON = dict(
    vocab_size=259,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=128,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)
DECODERS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "final_logit_softcapping": 5.0},
    "phi3": {},
    "olmo2": {},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.5},
    "gpt_neox": {},
    "falcon": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
}
SEQ2SEQ = {
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=256),
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        decoder_start_token_id=257,
    ),
}


def _both_ways(objective, call):
    """(loss, grads) with chunked_loss on, then off; and whether it stayed on."""
    out = []
    for chunked in (True, False):
        objective.chunked_loss, objective._head_checked = chunked, False
        objective.model.zero_grad()
        loss = call()
        loss.backward()
        out.append(
            (
                loss.item(),
                [p.grad.clone() for p in objective.model.parameters() if p.grad is not None],
                objective.chunked_loss,
            )
        )
    return out


@pytest.mark.parametrize("family", [*DECODERS, *SEQ2SEQ])
def test_chunked_loss_equals_the_plain_loss_on_every_family(family):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.manual_seed(0)
    if family in SEQ2SEQ:
        cfg = AutoConfig.for_model(family, **{**COMMON, **SEQ2SEQ[family]})
        objective = Seq2SeqLM()
        objective.model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
        labels = torch.randint(0, 256, (2, 7), generator=g)
        labels[1, 5:] = IGNORE
        call = partial(objective, ids, mask, labels, loss=True)
    else:
        cfg = AutoConfig.for_model(family, **{**COMMON, **DECODERS[family]})
        objective = CausalLM()
        objective.model = AutoModelForCausalLM.from_config(cfg).eval()
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[0, :3] = IGNORE
        call = partial(objective, ids, mask, labels=labels)
    (chunked, grads_c, stayed_on), (plain, grads_p, _) = _both_ways(objective, call)
    assert stayed_on  # the head ftlab reads gave the model's own logits
    assert chunked == pytest.approx(plain, rel=1e-5)
    for a, b in zip(grads_c, grads_p):  # some are ~0 (a bias under a norm): an absolute floor for those
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-7


def test_a_head_that_does_not_match_falls_back_to_the_plain_loss(monkeypatch, caplog):
    objective = _objective()
    real = OutputHead.of
    monkeypatch.setattr(OutputHead, "of", classmethod(lambda cls, m: OutputHead(real(m).weight, scale=2.0)))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        loss = objective(ids, torch.ones_like(ids), labels=ids)
    assert "using the plain loss" in caplog.text and not objective.chunked_loss
    objective.chunked_loss = False
    assert loss.item() == pytest.approx(objective(ids, torch.ones_like(ids), labels=ids).item(), rel=1e-6)


@pytest.mark.parametrize(
    "method,words",
    [
        (lambda: PromptTuning(num_virtual_tokens=2), "changes the input in front"),
        (lambda: LongLoRA(rank=2, group_size=4), "'ftlab_s2attn'"),
    ],
)
def test_methods_that_cannot_pack_say_so(rows, method, words):
    dm, packed_rows = rows
    batch = collate_packed(packed_rows[:1], dm.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=words):
        _objective(method()).training_step(batch, 0)


def _lora_model() -> CausalLM:
    L.seed_everything(0)
    return CausalLM(
        Backbone(pretrained=False),
        LoRA(rank=2, targets=["q_proj", "v_proj"]),
        optimizer=partial(torch.optim.SGD, lr=1.0),
        exact_match=False,
    )


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _one_step(dm, accumulate: int, tmp_path) -> dict[str, torch.Tensor]:
    model = _lora_model()
    L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    ).fit(model, dm)
    return _trainable(model)


def test_a_step_is_the_mean_over_its_tokens_whatever_the_batching(tmp_path):
    """One SGD step on the same 8 samples: one padded batch, two accumulated padded batches of unequal
    token counts, and packed rows accumulated over three micro-batches all give the same weights."""

    def data(packing: bool, batch_size: int):
        return InstructionData(
            template="alpaca_short",
            max_length=192,
            batch_size=batch_size,
            synthetic_train_size=8,
            synthetic_val_size=2,
            packing=packing,
        )

    halves = data(False, 4)
    halves.setup("fit")
    order = list(iter(halves.train_dataloader().sampler))
    counts = [
        count_targets(
            halves.collate([halves.splits["train"][i] for i in order[h : h + 4]], "train")["labels"]
        )
        for h in (0, 4)
    ]
    assert counts[0] != counts[1]  # so a mean of the two batch means would differ from the token mean
    whole = _one_step(data(False, 8), 1, tmp_path)
    packed = data(True, 2)
    packed.setup("fit")
    assert len(packed.splits["train"]) <= 6  # three micro-batches of two rows hold every sample
    start = _lora_model()
    start.configure_model()
    start = _trainable(start)
    assert all(_gap(whole[n], start[n]) > 1e-3 for n in whole if n.endswith("lora_B.default"))  # it stepped
    for other in (_one_step(halves, 2, tmp_path), _one_step(packed, 3, tmp_path)):
        for name in whole:  # the step taken, compared as a whole tensor
            assert _gap(other[name] - start[name], whole[name] - start[name]) <= 1e-5, name


@pytest.mark.parametrize("method", [Full(), PromptTuning(num_virtual_tokens=4)], ids=["full", "prompt"])
def test_preference_and_rl_logprobs_chunked_equal_the_plain_ones_and_their_gradients(method):
    """DPO/KTO/ORPO/SimPO read ``sequence_logps``; PPO/GRPO/RLOO ``response_logprobs`` (with PPO's value
    hidden states and a sampling temperature): chunked or not, the same numbers and gradients."""
    from ftlab.preference_logps import sequence_logps
    from ftlab.rollouts import response_logprobs

    model = _objective(method).model
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row, as rollouts have
    labels = ids.masked_fill(torch.arange(14) < 6, IGNORE)
    params = [p for p in model.parameters() if p.requires_grad]
    for average in (False, True):
        a, b = (sequence_logps(model, ids, mask, labels, average, chunked=c) for c in (True, False))
        assert _gap(a, b) < 1e-5
        ga, gb = (torch.autograd.grad(x.sum(), params) for x in (a, b))
        assert max(_gap(x, y) for x, y in zip(ga, gb)) < 1e-5
    a, b = (
        response_logprobs(model, ids, mask, ids[:, 6:], 6, 0.7, hidden=True, chunked=c) for c in (True, False)
    )
    assert a["logprobs"].shape == (3, 8) and a["hidden"].shape[:2] == (3, 8)
    assert _gap(a["logprobs"], b["logprobs"]) < 1e-5 and _gap(a["hidden"], b["hidden"]) < 1e-5
    ga, gb = (torch.autograd.grad(x["logprobs"].sum() + x["hidden"].sum(), params) for x in (a, b))
    assert max(_gap(x, y) for x, y in zip(ga, gb)) < 1e-5
