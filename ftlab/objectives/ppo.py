"""PPO against a reward model or a reward function: the RL step of RLHF.

Ziegler et al. (2019, arXiv:1909.08593), InstructGPT (Ouyang et al., 2022); the update rules are
in ``ftlab.losses.ppo``. One training step is one PPO iteration:

1. rollouts: ``num_rollouts`` responses sampled from the policy for the batch's prompts (cycled
   when there are fewer prompts: several samples each), generated ``chunk_size`` at a time;
2. scores from the reward model or reward function, clipped to ``±cliprange_reward``;
3. per-token rewards ``−β (log π_old − log π_ref)`` plus the score on the last token, where the
   reference ``π_ref`` is the *same* model with the method switched off (one frozen base in
   memory); ``β`` follows the adaptive KL controller (``init_kl_coef``, ``target``, ``horizon``);
4. advantages by GAE (``gamma``, ``lam``), whitened;
5. ``ppo_epochs`` passes over the rollouts in mini-batches: clipped policy loss (``cliprange``)
   plus ``vf_coef`` × clipped value loss (``cliprange_value``), one optimizer step each
   (Lightning manual optimisation: ``trainer.max_steps`` counts these steps).

Starting from an SFT adapter (``adapter``) trains that adapter further; the reference is then the
base *without* it. To keep an SFT model as the reference, merge it first (``ftlab export``) and
use the merged model as the backbone.

The value head is a linear map on the policy's last hidden state: it shares the trunk, trains
with the method's parameters and is saved with the adapter. Rollouts and scoring run in eval
mode (no dropout). Logged: ``train/reward``, ``train/kl``, ``train/kl_coef``, ``train/entropy``,
``train/clip_frac``, ``train/value_loss``, ``train/policy_loss``, ``train/explained_variance``,
``train/response_length``; ``val/reward`` and ``val/kl`` on validation prompts.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ftlab.losses.ppo import (
    KLController, clip_rewards, entropy_from_logits, explained_variance, gae, kl_penalty_rewards,
    masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss, token_logprobs,
)
from ftlab.models.backbone import Backbone
from ftlab.objectives._base import Objective
from ftlab.peft import io
from ftlab.peft.method import Method, can_disable, describe


class PPO(Objective):
    """Proximal policy optimisation of a causal LM against a reward.

    Args:
        backbone: The policy's base model (causal LM).
        method: How the policy adapts it; it must be switchable off (LoRA, QLoRA, Adapter,
            PrefixTuning, PromptTuning) since the reference policy is the frozen base.
        optimizer: Optimizer class and arguments (method parameters and value head).
        scheduler: Learning-rate scheduler, stepped once per optimizer step.
        adapter: Start from a saved adapter (e.g. the SFT run's) instead of a fresh method.
        max_length: Prompt tokens (linked from the data); with ``max_new_tokens`` it must fit the model.
        reward_fn: Import path of a reward function ``f(prompts, responses, **reward_kwargs)`` returning
            one number per response (e.g. ``ftlab.rewards.char_fraction``).
        reward_model: Directory of an ftlab ``RewardModel`` adapter (what its run saved), used instead
            of ``reward_fn``. Its tokenizer must be the policy's.
        reward_backbone: The reward model's backbone; default: the base named in its adapter file.
        reward_kwargs: Keyword arguments of ``reward_fn``, or of ``RewardModel`` (e.g. ``pooling``).
        num_rollouts: Rollouts per PPO iteration; default: one per prompt of the batch.
        chunk_size: Rollouts generated (and scored) at once.
        mini_batch_size: Rollouts per optimizer step; default: all of them.
        ppo_epochs: Passes over each iteration's rollouts.
        max_new_tokens: Response budget in tokens.
        generation_kwargs: Extra ``generate`` arguments; sampling defaults to pure ancestral sampling
            (``do_sample: true, top_k: 0, top_p: 1.0``), which keeps the rollouts on-policy.
        init_kl_coef: Starting KL penalty coefficient β.
        target: KL target (nats per response) of the adaptive controller; null keeps β fixed.
        horizon: Adaptive controller horizon, in rollouts.
        gamma: GAE discount.
        lam: GAE λ.
        cliprange: Policy ratio clip ε.
        cliprange_value: Value clip ε_v (reward units).
        cliprange_reward: Scores are clipped to ``±cliprange_reward`` (null: no clipping).
        vf_coef: Weight of the value loss.
        max_grad_norm: Gradient-norm clip per optimizer step (null: none).
    """

    heads = ("value_head",)

    def __init__(
        self,
        backbone: Backbone | None = None,
        method: Method | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        reward_fn: str | None = None,
        reward_model: str | None = None,
        reward_backbone: Backbone | None = None,
        reward_kwargs: dict[str, Any] | None = None,
        num_rollouts: int | None = None,
        chunk_size: int = 16,
        mini_batch_size: int | None = None,
        ppo_epochs: int = 4,
        max_new_tokens: int = 32,
        generation_kwargs: dict[str, Any] | None = None,
        init_kl_coef: float = 0.05,
        target: float | None = 6.0,
        horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        cliprange_reward: float | None = 10.0,
        vf_coef: float = 0.1,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("PPO needs exactly one reward: reward_fn (an import path) or reward_model "
                             "(a RewardModel adapter)")
        for name, value in (("chunk_size", chunk_size), ("ppo_epochs", ppo_epochs), ("max_new_tokens", max_new_tokens),
                            ("num_rollouts", num_rollouts or 1), ("mini_batch_size", mini_batch_size or 1)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.automatic_optimization = False
        self.reward_fn_path, self.reward_model_path = reward_fn, reward_model
        self.reward_backbone, self.reward_kwargs = reward_backbone, dict(reward_kwargs or {})
        self.reward_fn = _import_function(reward_fn) if reward_fn else None
        self.num_rollouts, self.chunk_size, self.mini_batch_size = num_rollouts, chunk_size, mini_batch_size
        self.ppo_epochs, self.max_new_tokens = ppo_epochs, max_new_tokens
        self.generation_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0} | dict(generation_kwargs or {})
        self.temperature = float(self.generation_kwargs.get("temperature", 1.0))
        self.kl_ctl = KLController(init_kl_coef, target, horizon)
        self.gamma, self.lam, self.cliprange, self.cliprange_value = gamma, lam, cliprange, cliprange_value
        self.cliprange_reward, self.vf_coef, self.max_grad_norm = cliprange_reward, vf_coef, max_grad_norm
        self.value_head: nn.Module | None = None
        self._reward_model = None  # kept out of the module tree: never trained, never checkpointed
        self.history: list[dict[str, float]] = []  # one row of stats per PPO iteration

    # ------------------------------------------------------------------ model
    def build(self):
        model = self.backbone.load("causal_lm")
        self.value_head = nn.Linear(model.config.hidden_size, 1, dtype=next(model.parameters()).dtype)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no random critic noise in the first advantages
        nn.init.zeros_(self.value_head.bias)
        return model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if not can_disable(self.method, self.model):
            raise ValueError(
                f"PPO's reference policy is the frozen base with the method switched off, which "
                f"{describe(self.method)['class']} cannot do (parameters of the base itself train): use a method "
                "that adds modules beside a frozen base (LoRA, QLoRA, Adapter, PrefixTuning, PromptTuning)"
            )
        if self.reward_model_path:
            self._load_reward_model()

    def _check_positions(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.max_length and limit and self.max_length + self.max_new_tokens > limit:
            raise ValueError(
                f"prompts of up to data.max_length={self.max_length} tokens plus max_new_tokens={self.max_new_tokens} "
                f"exceed {self.backbone.name_or_path}'s {limit} positions; lower one of them"
            )

    def _load_reward_model(self) -> None:
        from ftlab.objectives.reward_model import RewardModel

        path = Path(self.reward_model_path)
        if not (path / io.CONFIG).exists():
            raise ValueError(f"reward_model {path} is not an ftlab adapter directory ({io.CONFIG} is missing)")
        meta = json.loads((path / io.CONFIG).read_text())
        objective = meta.get("extra", {}).get("objective", "")
        if not objective.endswith(".RewardModel"):
            raise ValueError(f"reward_model {path} was saved by {objective or 'an unknown objective'}, not a RewardModel")
        base = meta.get("base", {}).get("name_or_path")
        if self.reward_backbone is None and not base:
            raise ValueError(f"reward_model {path}: {io.CONFIG} names no base model; set reward_backbone")
        backbone = self.reward_backbone or Backbone(name_or_path=base)
        mine, theirs = self.tokenizer, backbone.tokenizer()
        if not _same_tokenizer(mine, theirs):
            raise ValueError(
                f"the reward model's tokenizer ({backbone.name_or_path}: {len(theirs)} tokens) differs from the "
                f"policy's ({self.backbone.name_or_path}: {len(mine)} tokens): it would score other tokens than the "
                "policy wrote; train the reward model on the policy's backbone"
            )
        reward = RewardModel(backbone, adapter=str(path), **self.reward_kwargs)
        reward.configure_model()
        # object.__setattr__: a plain attribute, not a submodule (no checkpoint, no parameter count)
        object.__setattr__(self, "_reward_model", reward.eval().requires_grad_(False))

    # ------------------------------------------------------------------ forward passes
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) ids and mask (left padding allowed) -> logits (N, T, V) and values (N, T)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() numbers left-padded rows
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, -input_ids.size(1):]  # (N, T, H); virtual prompt tokens sit in front
        return out.logits, self.value_head(hidden).squeeze(-1).float()

    def _response_stats(self, seq, mask, responses, prompt_len: int):
        """Log-probs (and values, logits) of the response tokens, from logits one position earlier."""
        logits, values = self(seq, mask)
        logits = logits[:, prompt_len - 1:-1] / self.temperature  # (N, R, V)
        return token_logprobs(logits, responses), values[:, prompt_len - 1:-1], logits

    @torch.no_grad()
    def rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        """Sample, score and evaluate ``num_rollouts`` responses to left-padded prompts (B, P)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        P = input_ids.size(1)
        if limit and P + self.max_new_tokens > limit:
            raise ValueError(f"prompts of {P} tokens plus max_new_tokens={self.max_new_tokens} exceed "
                             f"{self.backbone.name_or_path}'s {limit} positions; shorten the prompts or lower max_new_tokens")
        n = self.num_rollouts or input_ids.size(0)
        pick = torch.arange(n, device=input_ids.device) % input_ids.size(0)
        input_ids, attention_mask = input_ids[pick], attention_mask[pick]
        prompts = [prompts[i] for i in pick.tolist()]
        tok = self.tokenizer
        training = self.training
        self.eval()
        try:
            parts = []
            for s in range(0, n, self.chunk_size):
                out = self.model.generate(
                    input_ids=input_ids[s:s + self.chunk_size], attention_mask=attention_mask[s:s + self.chunk_size],
                    max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    **self.generation_kwargs,
                )
                parts.append(out[:, P:])
            R = max(p.size(1) for p in parts)
            responses = torch.full((n, R), tok.pad_token_id, dtype=torch.long, device=input_ids.device)
            generated = torch.zeros((n, R), dtype=torch.bool, device=input_ids.device)
            row = 0
            for p in parts:
                responses[row:row + p.size(0), :p.size(1)] = p
                generated[row:row + p.size(0), :p.size(1)] = True
                row += p.size(0)
            is_eos = responses == tok.eos_token_id
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            response_mask = (generated & ~after_eos).long()  # (n, R): up to and including the first EOS
            seq = torch.cat([input_ids, responses], 1)  # (n, P + R)
            mask = torch.cat([attention_mask, response_mask], 1)
            logprobs, values, ref_logprobs, entropy = [], [], [], []
            for s in range(0, n, self.chunk_size):
                c = slice(s, s + self.chunk_size)
                lp, v, logits = self._response_stats(seq[c], mask[c], responses[c], P)
                with self.method.disabled(self.model):
                    ref, _, _ = self._response_stats(seq[c], mask[c], responses[c], P)
                logprobs.append(lp), values.append(v), ref_logprobs.append(ref)
                entropy.append(entropy_from_logits(logits))
            texts = tok.batch_decode(responses.masked_fill(response_mask == 0, tok.pad_token_id), skip_special_tokens=True)
            scores = self.score(prompts, texts)
        finally:
            self.train(training)
        return {
            "seq": seq, "mask": mask, "responses": responses, "response_mask": response_mask, "prompt_len": P,
            "logprobs": torch.cat(logprobs), "values": torch.cat(values), "ref_logprobs": torch.cat(ref_logprobs),
            "entropy": torch.cat(entropy), "scores": scores, "prompts": prompts, "texts": texts,
        }

    # ------------------------------------------------------------------ rewards
    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """One score per (prompt, response) text pair: (N,) fp32 on the module's device."""
        if self.reward_fn is not None:
            raw = self.reward_fn(prompts, responses, **self.reward_kwargs)
            scores = torch.as_tensor(raw if isinstance(raw, torch.Tensor) else list(raw), dtype=torch.float).flatten()
            if scores.numel() != len(responses):
                raise ValueError(f"reward_fn {self.reward_fn_path} returned {scores.numel()} scores "
                                 f"for {len(responses)} responses")
        else:
            rm = self._reward_model.to(self.device)
            c = self.chunk_size
            scores = torch.cat([rm(*self._reward_inputs(prompts[s:s + c], responses[s:s + c]))
                                for s in range(0, len(prompts), c)]).float()
        if not torch.isfinite(scores).all():
            raise ValueError(f"the reward gave non-finite scores: {scores.tolist()}")
        return scores.to(self.device)

    def _reward_inputs(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids in the reward model's training layout (``PreferenceData``): special head,
        prompt, a space and the stripped response, then EOS; cut from the prompt's left if too long."""
        from ftlab.data._base import pad
        from ftlab.data.pairs import special_frame

        tok = self.tokenizer
        head, tail = special_frame(tok)
        if not tail and tok.eos_token_id is not None:
            tail = [tok.eos_token_id]
        limit = getattr(self._reward_model.model.config, "max_position_embeddings", None) or 10**9
        seqs = []
        for p, r in zip(prompts, responses):
            body = tok(p, add_special_tokens=False)["input_ids"] + tok(" " + r.strip(), add_special_tokens=False)["input_ids"]
            body = body[-(limit - len(head) - len(tail)):]
            seqs.append(head + body + tail)
        ids = pad(seqs, tok.pad_token_id).to(self.device)
        return ids, pad([[1] * len(s) for s in seqs], 0).to(self.device)

    # ------------------------------------------------------------------ PPO iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ro = self.rollout(batch["input_ids"], batch["attention_mask"], batch["prompts"])
        rmask = ro["response_mask"]
        scores = clip_rewards(ro["scores"], self.cliprange_reward)
        rewards, kl = kl_penalty_rewards(scores, ro["logprobs"], ro["ref_logprobs"], rmask, self.kl_ctl.value)
        advantages, returns = gae(rewards, ro["values"], rmask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, rmask)
        n, P = rmask.size(0), ro["prompt_len"]
        size = self.mini_batch_size or n
        opt, sched = self.optimizers(), self.lr_schedulers()
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "value_clip_frac": 0.0, "approx_kl": 0.0}
        updates = 0
        for _ in range(self.ppo_epochs):
            for idx in torch.randperm(n, device=rmask.device).split(size):
                logprobs, values, _ = self._response_stats(ro["seq"][idx], ro["mask"][idx], ro["responses"][idx], P)
                m = rmask[idx]
                pg_loss, clip_frac, approx_kl = ppo_policy_loss(
                    logprobs, ro["logprobs"][idx], advantages[idx], m, self.cliprange)
                vf_loss, vf_clip = ppo_value_loss(values, ro["values"][idx], returns[idx], m, self.cliprange_value)
                loss = pg_loss + self.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    return loss.detach()  # before stepping: StopOnNonFinite stops the run with the weights intact
                opt.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                if sched is not None:
                    sched.step()
                for k, v in zip(sums, (pg_loss, vf_loss, clip_frac, vf_clip, approx_kl)):
                    sums[k] += float(v.detach())
                updates += 1
        # nats per response, averaged over processes so every rank's controller moves the same way
        mean_kl = float(self.trainer.strategy.reduce(kl.sum(1).mean(), reduce_op="mean"))
        stats = {
            "reward": float(ro["scores"].mean()),
            "kl": mean_kl,
            "kl_coef": self.kl_ctl.value,
            "entropy": float(masked_mean(ro["entropy"], rmask)),
            "explained_variance": float(explained_variance(ro["values"], returns, rmask)),
            "response_length": float(rmask.sum(1).float().mean()),
            **{k: v / updates for k, v in sums.items()},
        }
        self.kl_ctl.update(mean_kl, n)
        self.history.append(stats)
        shown = ("reward", "kl")
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k not in shown}, batch_size=n)
        self.log_dict({f"train/{k}": stats[k] for k in shown}, prog_bar=True, batch_size=n)
        loss = torch.tensor(stats["policy_loss"] + self.vf_coef * stats["value_loss"])
        self.log("train/loss", loss, batch_size=n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ro = self.rollout(batch["input_ids"], batch["attention_mask"], batch["prompts"])
        n = ro["scores"].numel()
        kl = (ro["logprobs"] - ro["ref_logprobs"]) * ro["response_mask"]
        self.log("val/reward", ro["scores"].mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/kl", kl.sum(1).mean(), batch_size=n, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        ro = self.rollout(batch["input_ids"], batch["attention_mask"], batch["prompts"])
        return [{"prompt": p, "response": t, "reward": float(s)} for p, t, s in zip(ro["prompts"], ro["texts"], ro["scores"])]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_coef"] = self.kl_ctl.value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_ctl.value = float(checkpoint.get("ppo_kl_coef", self.kl_ctl.value))


def _import_function(path: str) -> Callable:
    """``pkg.module.function`` or ``pkg.module:function`` -> the function, with a clear error."""
    module_name, sep, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"reward_fn {path!r} is not an import path like 'ftlab.rewards.char_fraction'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_fn {path!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"reward_fn {path!r} is not callable")
    return fn


def _same_tokenizer(a, b) -> bool:
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s) == getattr(b, s) for s in special)
