"""The contract every method meets, with the defaults a new method inherits.

A method is a class with a typed, documented ``__init__`` (its CLI schema) that implements
``apply`` and ``hparams``. Everything else that objectives, ``ftlab export``, adapter files and the
preference objectives' reference policy use has a default here, or a clear "this method cannot"
error. A new method subclasses ``Method`` (to inherit the defaults) and overrides what it can do
better; nothing elsewhere lists method classes. See README, "Adding a method".

    class Method(Protocol):
        apply(model)                  freeze what must be frozen, inject modules, mark what trains
        hparams() -> dict             the __init__ arguments that rebuild it (written in adapter files)
        state_dict(model)             what an adapter file holds          (default: trainable tensors)
        load_state_dict(model, state) the inverse, onto a model it was applied to (default: by name)
        num_parameters(model) -> int  the method's own formula            (default: trainable count)
        disabled(model)               context manager running the frozen base (default: MethodError)
        merge_and_unload(model)       fold into the base weights, remove wrappers (default: MethodError)
        param_groups(model) -> list   optimizer groups; "lr_scale" scales a group's lr (default: one)

An adapter file records the method by its import path and ``hparams()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class MethodError(ValueError):
    """A method asked for something it cannot do (the message says what would work instead)."""


@runtime_checkable
class Method(Protocol):
    """How a backbone is adapted: which parameters exist and which train (see the module docstring)."""

    def apply(self, model: nn.Module) -> None: ...

    def hparams(self) -> dict[str, Any]: ...

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds: by default every trainable tensor, by parameter name."""
        return trainable_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load what ``state_dict`` gave onto ``model`` after ``apply`` (by parameter name)."""
        load_named(model, state)

    def num_parameters(self, model: nn.Module) -> int:
        """Trainable parameters this method adds or unfreezes. Override with the method's own
        formula: the invariant tests compare it with what actually trains."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        """A context manager inside which ``model`` computes the frozen base exactly (the reference
        policy of DPO, PPO...). Raises ``MethodError`` when called (not only when entered) if the
        method cannot give the base back, e.g. because it trains the base's own weights."""
        raise MethodError(
            f"{type(self).__name__} cannot switch itself off, so the frozen base is not in memory; "
            "a method that adds modules beside a frozen base (LoRA, adapters, prefixes...) can"
        )

    def merge_and_unload(self, model: nn.Module) -> None:
        """Fold the method into the base weights and remove its modules: a plain model remains."""
        raise MethodError(
            f"{type(self).__name__} adds computation that cannot be folded into the base weights; "
            "keep the adapter file and load it with the method instead"
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable tensors. A group may carry ``lr_scale``: its
        learning rate is the optimizer's times that factor (what LoRA+ uses)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]


# ---------------------------------------------------------------------------------- helpers
def freeze(model: nn.Module) -> None:
    """Stop every parameter of ``model`` from training."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train, by their name in ``model`` (detached, contiguous)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_named(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into ``model``'s parameters of the same names; a name the model does not have
    is a ``MethodError`` (a file of another method or model, not a silent partial load)."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise MethodError(f"tensors with no place in this model: {unknown[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise MethodError(f"tensor {key}: shape {tuple(value.shape)} != {tuple(params[key].shape)}")
            params[key].copy_(value)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as the values they hold."""
    trainable = total = 0
    for p in model.parameters():
        # Two 4-bit values per byte of storage, whatever dtype the packed storage uses.
        n = p.numel() * (2 * p.element_size() if getattr(p, "quant_state", None) is not None else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe(method: Any) -> dict[str, Any]:
    """``{"class": name, **hparams}``: how runs, summaries and W&B name a method."""
    hp = method.hparams() if hasattr(method, "hparams") else {}
    return {"class": type(method).__name__, **hp}


#: Methods that read and write PEFT's adapter format, in the order they were defined.
PEFT_FORMATS: list[type] = []


def peft_format(cls: type) -> type:
    """Class decorator: ``cls`` reads and writes PEFT adapters. It implements
    ``reads_peft(config) -> bool`` (a classmethod: is this PEFT config mine?),
    ``from_peft(config, tensors, model, adapter_name)`` (a classmethod: apply and load) and
    ``to_peft(model) -> (config, tensors)``. Later classes are asked first, so a subclass that
    reads a narrower config (DoRA's ``use_dora``) wins over its parent."""
    PEFT_FORMATS.append(cls)
    return cls


@contextmanager
def switched_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Set ``enabled = False`` on each module inside the block and restore it after, errors included:
    how a method whose modules compute ``base(x)`` when disabled gives the base back."""
    modules = list(modules)
    saved = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, saved):
            m.enabled = enabled


def can_disable(method: Method, model: nn.Module) -> bool:
    """Whether ``method.disabled(model)`` gives the frozen base (it raises ``MethodError`` if not)."""
    try:
        method.disabled(model)
    except MethodError:
        return False
    return True
