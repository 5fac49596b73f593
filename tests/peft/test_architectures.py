"""Every method on every common Hugging Face architecture, loaded as a user's checkpoint would be.

Tiny random checkpoints of 13 decoder, 6 encoder and 2 encoder-decoder families are written once
per session with ``save_pretrained`` (and ftlab's byte tokenizer) and loaded through ``Backbone``
from their folders. Each (architecture, method) cell: apply; one optimiser step in which exactly the
method's parameters get gradients and their count is the method's formula; the method starts as the
base (or, for prompt and prefix tuning, switching it off gives the base); save -> load onto a fresh
base gives the same outputs; for LoRA, merge -> ``ftlab export`` (or ``save_pretrained``) -> plain
transformers reload gives the same logits. Cells refused by design are listed with their reason,
and the test asserts the one clear error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftlab.models.backbone import Backbone
from ftlab.models.tokenizer import byte_tokenizer
from ftlab.peft import (
    IA3,
    Adapter,
    DoRA,
    Full,
    LongLoRA,
    LoRA,
    PrefixTuning,
    PromptTuning,
    QLoRA,
    count_parameters,
)
from ftlab.peft.io import load_adapter, save_adapter

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
    "gemma3_text": {"head_dim": 16},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "gpt_neox": {},
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "falcon": {},
}
ENCODERS = {
    "bert": {},
    "roberta": dict(max_position_embeddings=386),
    "deberta-v2": {},
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "electra": dict(embedding_size=32),
    "modernbert": dict(cls_token_id=257, sep_token_id=258),
}
ENCODER_DECODERS = {
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
KIND = {
    **dict.fromkeys(DECODERS, "causal_lm"),
    **dict.fromkeys(ENCODERS, "encoder"),
    **dict.fromkeys(ENCODER_DECODERS, "seq2seq_lm"),
}
CONFIGS = {**DECODERS, **ENCODERS, **ENCODER_DECODERS}

METHODS = {
    "full": lambda: Full(),
    "lora": lambda: LoRA(rank=4, targets=["all-linear"]),
    "qlora": lambda: QLoRA(rank=4),
    "longlora": lambda: LongLoRA(rank=4, group_size=4),
    "prefix": lambda: PrefixTuning(num_virtual_tokens=3),
    "prompt": lambda: PromptTuning(num_virtual_tokens=3),
    "adapter": lambda: Adapter(placement="houlsby", reduction_factor=4),
    "dora": lambda: DoRA(rank=4, targets=["attention"]),
    "ia3": lambda: IA3(),
}
NOT_CAUSAL = "S²-Attn is causal, but"
NO_INTERFACE = "attention does not go through transformers' AttentionInterface"
#: (architecture, method) -> the words of the one-line error that refuses the cell, and why.
REFUSED = {
    **{(a, "longlora"): NOT_CAUSAL for a in ENCODERS},  # S²-Attn's groups are causal
    **{(a, "longlora"): "S²-Attn is for decoder-only models" for a in ENCODER_DECODERS},
    (
        "falcon",
        "longlora",
    ): "does not let transformers switch its attention function",  # custom attention code
    ("gemma2", "longlora"): "soft-caps its attention logits",  # SDPA cannot soft-cap
    ("falcon", "prefix"): NO_INTERFACE,
    ("deberta-v2", "prefix"): NO_INTERFACE,  # disentangled attention computes its own scores
}
STARTS_ELSEWHERE = {
    "prefix",
    "prompt",
}  # attended from the first step: the check is that `disabled` gives the base
CELLS = [(a, m) for a in CONFIGS for m in METHODS]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random ``save_pretrained`` folder per architecture, with a tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = {"causal_lm": AutoModelForCausalLM, "encoder": AutoModel, "seq2seq_lm": AutoModelForSeq2SeqLM}
    root, folders = tmp_path_factory.mktemp("checkpoints"), {}
    tokenizer = byte_tokenizer()
    for name, extra in CONFIGS.items():
        torch.manual_seed(0)
        folders[name] = root / name
        auto[KIND[name]].from_config(AutoConfig.for_model(name, **{**COMMON, **extra})).save_pretrained(
            folders[name]
        )
        tokenizer.save_pretrained(folders[name])
    return folders


def _load(path: Path, kind: str):
    return Backbone(str(path)).load(kind).eval()


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 8), generator=gen)
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :5]} if kind == "seq2seq_lm" else {})}


def _out(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs)[0]


def _perturb(model) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(("arch", "method"), CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_method_on_architecture(arch, method, checkpoints, tmp_path):
    kind, path = KIND[arch], checkpoints[arch]
    model, inputs = _load(path, kind), _inputs(kind)
    base = _out(model, inputs)
    m = METHODS[method]()
    if (arch, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(arch, method)]):
            m.apply(model)
        return
    m.apply(model)

    # it starts as the base (QLoRA: as its own 4-bit base), or switching it off gives the base
    if method not in STARTS_ELSEWHERE:
        reference = base
        if method == "qlora":
            with m.disabled(model):
                reference = _out(model, inputs)
        torch.testing.assert_close(_out(model, inputs), reference, atol=1e-5, rtol=0)
    else:
        with m.disabled(model):
            torch.testing.assert_close(_out(model, inputs), base, atol=1e-5, rtol=0)

    # one optimiser step: exactly the method's parameters get gradients, as many as its formula says
    _perturb(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    out = model(**inputs)
    sum(
        v.float().pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    ).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert count_parameters(model)[0] == m.num_parameters(model) > 0
    opt.step()
    adapted = _out(model, inputs)

    # save -> load onto a fresh base
    backbone = Backbone(str(path))
    saved = save_adapter(
        tmp_path / "adapter",
        model,
        m,
        backbone.fingerprint(model),
        extra={
            "objective": {
                "causal_lm": "ftlab.objectives.causal_lm.CausalLM",
                "seq2seq_lm": "ftlab.objectives.seq2seq.Seq2SeqLM",
            }.get(kind, "")
        },
    )
    fresh = _load(path, kind)
    load_adapter(saved, fresh, backbone.fingerprint(fresh))
    torch.testing.assert_close(_out(fresh, inputs), adapted, atol=1e-5, rtol=1e-5)

    if method == "lora":  # merged, written as a plain model, read back by transformers alone
        _reload_merged(saved, path, kind, inputs, adapted, tmp_path)


def _reload_merged(adapter: Path, path: Path, kind: str, inputs, adapted, tmp_path) -> None:
    from transformers import AutoModel

    from ftlab.export import export

    if kind == "encoder":  # ftlab export writes generative models; an encoder merges and saves the same way
        model = _load(path, kind)
        method, _ = load_adapter(adapter, model, Backbone(str(path)).fingerprint(model))
        method.merge_and_unload(model)
        model.save_pretrained(tmp_path / "merged")
        reloaded = AutoModel.from_pretrained(tmp_path / "merged")
    else:
        out = export(adapter, tmp_path / "merged", Backbone(str(path)))
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        reloaded = (AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSeq2SeqLM).from_pretrained(
            out
        )
    torch.testing.assert_close(_out(reloaded, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_refusals_are_one_line_through_the_cli(checkpoints, tmp_path, capsys):
    from ftlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).parents[2] / "configs" / "longlora.yaml"),
                "--model.init_args.backbone.name_or_path",
                str(checkpoints["falcon"]),
                "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}",
                "--data.init_args.synthetic_train_size",
                "8",
                "--data.init_args.synthetic_val_size",
                "4",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "LongLoRA: FalconForCausalLM does not let transformers switch its attention function" in err
