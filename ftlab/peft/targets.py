"""Which modules a method touches: name patterns × layer selection, so placement is one argument.

A *target* is matched against each module's dotted name:

- a plain name (``q_proj``) matches modules whose last component is that name;
- a dotted suffix or glob (``self_attn.q_proj``, ``attn.*``, ``mlp.*_proj``) matches the end of the name;
- ``re:<regex>`` matches the full name with ``re.fullmatch``;
- ``all-linear`` matches every linear layer inside the transformer blocks (not the LM or
  classification head);
- ``attention`` matches every linear layer of each block's self-attention (its q/k/v or fused
  input projections and its output projection), found by structure (``ftlab.peft.blocks``), whatever
  the family calls them.

A *layer selection* keeps only modules inside the chosen transformer blocks: ``null`` (all), a
list of indices (negative counts from the top), or a string ``"a-b"`` (inclusive range),
``"top:k"``, ``"bottom:k"``, ``"top_half"``, ``"bottom_half"``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

LayerSelection = Sequence[int] | str | None
# Blocks sit under a parent (``model.layers.3``) or at the root of a bare trunk (``layers.3``, ``h.0``).
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


class TargetError(ValueError):
    """A target or layer selection that does not fit the model."""


def layer_index(name: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.3.mlp`` -> 3), or None."""
    found = LAYER_RE.search(name)
    return int(found.group(1)) if found else None


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks, from the config or from the module names."""
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    found = [i for n, _ in model.named_modules() if (i := layer_index(n)) is not None]
    if not found:
        raise TargetError("cannot find transformer blocks in this model (no '.layers.N.' in module names)")
    return max(found) + 1


def select_layers(selection: LayerSelection, n_layers: int) -> set[int]:
    """Resolve a layer selection to a set of block indices in ``[0, n_layers)``."""
    if selection is None or selection == "all":
        return set(range(n_layers))
    if isinstance(selection, str):
        s = selection.strip()
        half = n_layers // 2
        if s == "top_half":
            return set(range(n_layers - half, n_layers))
        if s == "bottom_half":
            return set(range(half))
        if m := re.fullmatch(r"(top|bottom):(\d+)", s):
            k = int(m.group(2))
            if not 0 < k <= n_layers:
                raise TargetError(f"layer selection {s!r}: k must be in 1..{n_layers}")
            return set(range(n_layers - k, n_layers)) if m.group(1) == "top" else set(range(k))
        if m := re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", s):
            lo, hi = (_check_index(int(g), n_layers) for g in m.groups())
            if lo > hi:
                raise TargetError(f"layer range {s!r} is empty")
            return set(range(lo, hi + 1))
        raise TargetError(
            f"layer selection {s!r} not understood; use a list of indices, 'a-b', 'top:k', 'bottom:k', "
            "'top_half', 'bottom_half' or 'all'"
        )
    indices = list(selection)
    if not indices:
        raise TargetError("layer selection is an empty list")
    return {_check_index(int(i), n_layers) for i in indices}


def _check_index(i: int, n_layers: int) -> int:
    if not -n_layers <= i < n_layers:
        raise TargetError(
            f"layer index {i} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return i % n_layers


def matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target)
    return name == target or name.endswith("." + target)


def find_targets(
    model: nn.Module,
    targets: str | Iterable[str],
    layers: LayerSelection = None,
    kinds: tuple[type, ...] = (nn.Linear,),
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``kinds`` that match ``targets`` inside the selected ``layers``.

    Raises ``TargetError`` listing the candidate module names when nothing matches.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise TargetError("no target modules given")
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    keep_layers = None if layers is None else select_layers(layers, num_layers(model))
    structural: set[str] = set()
    if "attention" in targets:
        from ftlab.peft.blocks import attention_targets

        structural = set(attention_targets(model))
    chosen = []
    for name, module in candidates:
        idx = layer_index(name)
        if "all-linear" in targets:
            hit = idx is not None
        else:
            hit = name in structural or any(matches(name, t) for t in targets)
        if hit and (keep_layers is None or (idx is not None and idx in keep_layers)):
            chosen.append((name, module))
    if not chosen:
        raise TargetError(
            f"targets {targets} (layers={layers!r}) match no module. Candidates: "
            f"{', '.join(module_patterns(candidates))}"
        )
    return chosen


def module_patterns(named: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Module names with block indices folded (``model.layers.*.self_attn.q_proj``), deduplicated."""
    seen: dict[str, None] = {}
    for name, _ in named:
        seen[LAYER_RE.sub(lambda m: m.group(0).replace(m.group(1), "*"), name)] = None
    return list(seen)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
