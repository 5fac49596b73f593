"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021,
arXiv:2104.08691).

The frozen model reads ``num_virtual_tokens`` learnable embeddings ``E_p`` (P × H) in front of
the embedded input; only ``E_p`` trains:

    h_0 = [E_p ; embed(x)]          (B, P + T, H)
    E_p ← E_p - η ∇_{E_p} L

``E_p`` starts as random vectors, as the embeddings of randomly sampled vocabulary tokens, or as
the embeddings of an initialisation text (repeated to fill P slots).

Everything happens in two hooks on the model handed to ``apply``, so no objective knows about it:
before the forward, ids become embeddings with the prompt in front, and the attention mask,
``position_ids``, ``token_type_ids`` and ``labels`` grow by P (ones, positions 0..P-1, zeros,
-100); after it, the P virtual positions are cut from ``logits``, ``last_hidden_state`` and
``hidden_states``, so outputs line up with the caller's tokens. In cached decoding (``generate``)
the prompt enters the cache on the first step; later steps only extend the mask and shift the
positions by P. (BERT's ``pooler_output`` reads position 0, which is then a virtual token.)

On an encoder-decoder (T5, BART) the hooks sit on the encoder, which every forward and ``generate``
call: the encoder reads the prompt, and the decoder cross-attends to the real tokens' encodings.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import nn

from ftlab.peft.method import Method, freeze, switched_off

ATTR = "ftlab_prompt"  # the prompt module's name on the model
_CACHED = "_ftlab_prompt_tokens"  # set on a cache object that holds the prompt
_STRIP = ("logits", "last_hidden_state")
DEFAULT_TOKENS = 20


class PromptEmbedding(nn.Module):
    """The soft prompt ``E_p`` (P, H) and the hooks that put it in front of every input."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(weight)  # (P, H)
        self.enabled = True
        self._prepended = 0  # set by the pre-hook, read by the post-hook of the same forward
        self._handles: list[Any] = []

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.size(0)

    def attach(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self._prepended = 0
        if not self.enabled:
            return None
        if args:  # HF forwards take input_ids first; everything else must be a keyword
            if len(args) > 1:
                raise TypeError("prompt tuning needs keyword arguments after input_ids")
            kwargs = {"input_ids": args[0], **kwargs}
        cache = kwargs["cache"] if "cache" in kwargs else kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            # A decoding step: the prompt is already in the cache, the caller's mask and
            # positions do not know about it.
            n = getattr(cache, _CACHED, 0)
            if n:
                _extend(kwargs, n, prepend_positions=False)
            return (), kwargs
        n = self.num_virtual_tokens
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, H)
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(embeds.size(0), -1, -1)  # (B, P, H)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, P + T, H)
        _extend(kwargs, n, prepend_positions=True)
        if cache is not None:
            setattr(cache, _CACHED, n)
        self._prepended = n
        return (), kwargs

    def _after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        n, self._prepended = self._prepended, 0
        if not n or not hasattr(output, "get"):  # tuples (return_dict=False) come back whole
            return None
        if (cache := output.get("cache")) is not None:  # one the model made: later steps must know
            setattr(cache, _CACHED, n)
        length = kwargs["inputs_embeds"].size(1)  # P + T
        for key in _STRIP:
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.size(1) == length:
                output[key] = value[:, n:]  # (B, T, ...)
        hidden = output.get("hidden_states")
        if isinstance(hidden, tuple):
            output["hidden_states"] = tuple(h[:, n:] if h.size(1) == length else h for h in hidden)
        return output

    def extra_repr(self) -> str:
        p, h = self.embedding.shape
        return f"num_virtual_tokens={p}, hidden={h}, enabled={self.enabled}"


def _extend(kwargs: dict[str, Any], n: int, prepend_positions: bool) -> None:
    """Grow the per-token inputs by ``n`` virtual positions in front (in place)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.size(0), n), mask], dim=1)  # (B, n + S)
    elif mask is not None:
        raise ValueError(f"prompt tuning needs a 2D attention mask (B, T), got shape {tuple(mask.shape)}")
    pos = kwargs.get("position_ids")
    if pos is not None:
        # The virtual tokens take positions 0..n-1; the real ones move up by n.
        shifted = pos + n
        if prepend_positions:
            head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            shifted = torch.cat([head, shifted], dim=-1)
        kwargs["position_ids"] = shifted
    if not prepend_positions:
        return
    if (types := kwargs.get("token_type_ids")) is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.size(0), n), types], dim=1)
    if (labels := kwargs.get("labels")) is not None:
        kwargs["labels"] = torch.cat([labels.new_full((labels.size(0), n), -100), labels], dim=1)


class PromptTuning(Method):
    """A learnable soft prompt in front of the input; the whole backbone stays frozen.

    Args:
        num_virtual_tokens: Prompt length P (> 0). Null: the init text's token count, or 20.
        init: ``random`` (N(0, σ²) with σ the embedding table's std), ``vocab`` (embeddings of P
            random vocabulary tokens) or ``text`` (embeddings of ``init_text``, repeated to fill P).
            Null: ``text`` when ``init_text`` is set, else ``vocab``.
        init_text: Text whose token embeddings start the prompt, e.g. "Classify the sentiment:".
        tokenizer: Tokenizer for ``init_text``: a preset (``tiny-llama``, ``minilm``), a hub name
            or a local path. Null uses the model's own ``name_or_path``.
    """

    def __init__(
        self,
        num_virtual_tokens: int | None = None,
        init: Literal["random", "vocab", "text"] | None = None,
        init_text: str | None = None,
        tokenizer: str | None = None,
    ):
        if num_virtual_tokens is not None and num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be > 0, got {num_virtual_tokens}")
        init = init or ("text" if init_text else "vocab")
        if init == "text" and not init_text:
            raise ValueError("init='text' needs init_text")
        if init != "text" and init_text:
            raise ValueError(f"init_text is only used with init='text', not init={init!r}")
        self.num_virtual_tokens, self.init = num_virtual_tokens, init
        self.init_text, self.tokenizer = init_text, tokenizer

    def apply(self, model: nn.Module) -> None:
        if hasattr(model, ATTR):
            raise ValueError("this model already has a prompt (PromptTuning was applied twice)")
        freeze(model)
        table = model.get_input_embeddings().weight  # (V, H)
        weight = self._initial_prompt(model, table)
        self.num_virtual_tokens = weight.size(0)
        prompt = PromptEmbedding(weight)
        model.add_module(ATTR, prompt)
        prompt.attach(model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model)

    def _initial_prompt(self, model: nn.Module, table: torch.Tensor) -> torch.Tensor:
        """(P, H) starting values, in the embedding table's dtype and device."""
        with torch.no_grad():
            if self.init == "text":
                ids = self._text_ids(model)
                n = self.num_virtual_tokens or len(ids)
                if len(ids) > n:
                    raise ValueError(
                        f"init_text is {len(ids)} tokens long but num_virtual_tokens is {n}; "
                        f"raise num_virtual_tokens to at least {len(ids)} or shorten the text"
                    )
                ids = (ids * (n // len(ids) + 1))[:n]  # repeat the text to fill the prompt
                return table[torch.tensor(ids, device=table.device)].clone()
            n = self.num_virtual_tokens or DEFAULT_TOKENS
            if self.init == "vocab":
                return table[torch.randint(0, table.size(0), (n,), device=table.device)].clone()
            std = table.float().std().item()
            return torch.randn(n, table.size(1), device=table.device).mul_(std).to(table.dtype)

    def _text_ids(self, model: nn.Module) -> list[int]:
        from ftlab.models.backbone import Backbone

        name = self.tokenizer or getattr(getattr(model, "config", None), "name_or_path", "")
        if not name:
            raise ValueError(
                "PromptTuning init_text needs a tokenizer: set tokenizer (e.g. tiny-llama, minilm or a path)"
            )
        ids = Backbone(name_or_path=name).tokenizer()(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init_text {self.init_text!r} has no tokens")
        return list(ids)

    def hparams(self) -> dict[str, Any]:
        return dict(
            num_virtual_tokens=self.num_virtual_tokens,
            init=self.init,
            init_text=self.init_text,
            tokenizer=self.tokenizer,
        )

    def num_parameters(self, model: nn.Module) -> int:
        """The formula ``P · H`` (H: the input embedding width)."""
        return prompt_module(model).num_virtual_tokens * model.get_input_embeddings().weight.size(1)

    def disabled(self, model: nn.Module) -> AbstractContextManager[None]:
        return disable_prompt(model)


# ---------------------------------------------------------------------------------- functions
def prompt_module(model: nn.Module) -> PromptEmbedding:
    module = getattr(model, ATTR, None)
    if not isinstance(module, PromptEmbedding):
        raise ValueError("this model has no soft prompt (apply PromptTuning first)")
    return module


def disable_prompt(model: nn.Module) -> AbstractContextManager[None]:
    """Run the base model: no prompt inside the block."""
    return switched_off([prompt_module(model)])
