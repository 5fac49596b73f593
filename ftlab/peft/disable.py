"""The frozen base back, whatever method adapted the model: one switch for every method's own.

Preference objectives (DPO, PPO) need the reference policy: the model *before* adaptation. For a
method that adds modules beside a frozen base (LoRA and QLoRA, bottleneck adapters, prefix and
prompt tuning), switching those modules off gives it exactly, with no second copy of the model:

    with base_model(model):   # every LoRA layer, adapter, prefix and prompt off inside the block
        ref_logits = model(input_ids).logits

``can_disable(model)`` says whether that is the true base: it is not when a parameter of the base
itself trains (``Full``, LoRA's ``trainable`` modules, LongLoRA's norms and embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from ftlab.peft import adapter, lora, prefix, prompt


def _switches(model: nn.Module) -> list[tuple[Callable, list[nn.Parameter]]]:
    """(disable context, the parameters it turns off) for each kind of method module in ``model``."""
    found = []
    layers = list(lora.lora_layers(model))
    if layers:
        found.append((lora.disable_adapters, [p for m in layers for d in (m.lora_A, m.lora_B) for p in d.values()]))
    bottlenecks = list(adapter.adapter_layers(model))
    if bottlenecks:
        found.append((adapter.disable_adapters, [p for m in bottlenecks for p in (*m.down.parameters(), *m.up.parameters())]))
    for kind, cls, disable in ((prefix, prefix.PrefixEncoder, prefix.disable_prefix),
                               (prompt, prompt.PromptEmbedding, prompt.disable_prompt)):
        module = getattr(model, kind.ATTR, None)
        if isinstance(module, cls):
            found.append((disable, list(module.parameters())))
    return found


def has_switch(model: nn.Module) -> bool:
    """True when ``model`` holds modules of a method that can be switched off."""
    return bool(_switches(model))


def can_disable(model: nn.Module) -> bool:
    """True when ``base_model(model)`` gives the frozen base: some method module can be switched
    off, and every trainable parameter of ``model`` belongs to such a module."""
    found = _switches(model)
    off = {id(p) for _, params in found for p in params}
    return bool(found) and all(id(p) in off for p in model.parameters() if p.requires_grad)


@contextmanager
def base_model(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block: every switchable method module off, restored after.

    Raises ``ValueError`` when ``model`` has nothing to switch off (e.g. ``Full``).
    """
    contexts = [ctx for ctx, _ in _switches(model)]
    if not contexts:
        raise ValueError(
            "this model has no method modules to switch off (full fine-tuning trains the base itself), "
            "so the frozen base is not in memory"
        )
    with ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx(model))
        yield
