"""What the on-policy objectives (PPO, GRPO, RLOO) share: rewards, rollouts, the update loop, evaluation.

An on-policy objective samples its own responses to the batch's prompts (``ftlab.rollouts``),
scores them (``ftlab.rewards.Rewards``), then takes several optimizer steps on those rollouts
(Lightning manual optimisation). One training batch is one iteration: bound a run by iterations
(``trainer.limit_train_batches``, ``max_epochs``), since ``trainer.max_steps`` counts optimizer steps,
whose number per iteration varies with ``target_kl``. The scheduler steps once per iteration.
The reference policy is the frozen base, the same model with the method switched off
(``ftlab.rollouts.frozen_base``); with ``base_adapter`` (the SFT step's adapter) folded into it, that
base is the SFT model. Dropout is off throughout, in rollouts and in updates, so the
ratio ``π / π_old`` of an update is 1 until the weights change.

Subclasses implement ``training_step`` (one iteration) and call ``rollout`` and ``update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftlab.objectives._base import Objective
from ftlab.peft.method import describe
from ftlab.rewards import Rewards
from ftlab.rollouts import (
    Rollout,
    base_adapter_record,
    check_base_adapter,
    check_budget,
    eval_mode,
    frozen_base,
    sft_model,
)
from ftlab.rollouts import rollout as sample_rollout


class OnlineObjective(Objective):
    """Base of PPO, GRPO and RLOO (see those for the arguments)."""

    def __init__(
        self,
        backbone,
        method,
        optimizer,
        scheduler,
        adapter,
        max_length,
        *,
        reward_fn: str | None,
        reward_model: str | None,
        reward_backbone: Any,
        reward_kwargs: dict | None,
        rewards: list[dict[str, Any]] | None,
        chunk_size: int,
        mini_batch_size: int | None,
        epochs: int,
        max_new_tokens: int,
        generation_kwargs: dict | None,
        val_generation_kwargs: dict | None,
        max_grad_norm: float | None,
        base_adapter: str | None = None,
    ):
        super().__init__(backbone, method, optimizer, scheduler, adapter, max_length)
        self.base_adapter = base_adapter
        name = type(self).__name__
        if reward_fn is not None and reward_model is not None:
            raise ValueError(
                f"{name} takes reward_fn or reward_model, not both (exactly one reward source each; "
                "combine several with rewards: [{fn: ...}, {model: ...}])"
            )
        for arg, value in (
            ("chunk_size", chunk_size),
            ("epochs", epochs),
            ("max_new_tokens", max_new_tokens),
            ("mini_batch_size", mini_batch_size or 1),
        ):
            if value <= 0:
                raise ValueError(f"{arg} must be > 0, got {value}")
        sources = []
        if reward_fn is not None:
            sources.append({"fn": reward_fn, "kwargs": reward_kwargs or {}})
        if reward_model is not None:
            sources.append(
                {"model": reward_model, "kwargs": reward_kwargs or {}, "backbone": reward_backbone}
            )
        if not sources and not rewards:
            raise ValueError(
                f"{name} needs a reward: reward_fn (an import path), reward_model (a RewardModel "
                "adapter) or a rewards list"
            )
        self.rewards = Rewards(sources + list(rewards or []), chunk_size)
        self.automatic_optimization = False
        self.chunk_size, self.mini_batch_size, self.epochs = chunk_size, mini_batch_size, epochs
        self.max_new_tokens, self.max_grad_norm = max_new_tokens, max_grad_norm
        # pure ancestral sampling keeps the rollouts on-policy: the log-probs are of what was sampled
        self.generation_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0} | dict(generation_kwargs or {})
        self.val_generation_kwargs = dict(val_generation_kwargs or self.generation_kwargs)
        self.temperature = float(self.generation_kwargs.get("temperature", 1.0))
        self.reference: Callable | None = None
        self.history: list[dict[str, float]] = []  # one dict of statistics per iteration

    # ------------------------------------------------------------------ model
    def build(self):
        if self.base_adapter:
            return sft_model(self.backbone, self.base_adapter, type(self).__name__)
        return self.backbone.load("causal_lm")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.adapter_path:
            check_base_adapter(self.adapter_path, self.base_adapter, type(self).__name__)
        super().configure_model()
        self.reference = frozen_base(self.model, self.method)
        if self.reference is None:
            raise ValueError(
                f"{type(self).__name__}'s reference policy is the frozen base with the method switched "
                "off, which "
                f"{describe(self.method)['class']} cannot do (parameters of the base itself train): use a "
                "method "
                "that adds modules beside a frozen base (LoRA, QLoRA, Adapter, PrefixTuning, PromptTuning)"
            )
        self.rewards.setup(self.tokenizer, self.backbone.name_or_path)

    def adapter_extra(self) -> dict[str, Any]:
        return base_adapter_record(self.base_adapter)

    def _check_positions(self) -> None:
        if self.max_length:
            check_budget(self.model, self.max_length, self.max_new_tokens, self.backbone.name_or_path)

    def value_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Hidden states (n, R, H) -> values (n, R) at rollout time; None without a value head."""
        return None

    # ------------------------------------------------------------------ rollouts
    def rollout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: list[str],
        repeats: int = 1,
        n: int | None = None,
        generation_kwargs: dict | None = None,
    ) -> Rollout:
        """Sample, then score: ``repeats`` consecutive responses per prompt (a group), or ``n`` rollouts
        cycling through the prompts; left-padded prompts (B, P)."""
        check_budget(self.model, input_ids.size(1), self.max_new_tokens, self.backbone.name_or_path)
        B = input_ids.size(0)
        if n is not None:
            pick = torch.arange(n, device=input_ids.device) % B
        else:
            pick = torch.arange(B, device=input_ids.device).repeat_interleave(
                repeats
            )  # (B·G,) groups contiguous
        ro = sample_rollout(
            self.model,
            self.reference,
            self.tokenizer,
            input_ids[pick],
            attention_mask[pick],
            [prompts[i] for i in pick.tolist()],
            max_new_tokens=self.max_new_tokens,
            generation_kwargs=generation_kwargs or self.generation_kwargs,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            value_fn=self.value_fn(),
        )
        ro.scores, ro.components = self.rewards(ro.prompts, ro.texts, self.device)
        return ro

    # ------------------------------------------------------------------ updates
    def update(
        self,
        n: int,
        loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        target_kl: float | None = None,
    ) -> dict[str, float] | None:
        """``epochs`` passes over ``n`` rollouts in shuffled mini-batches, one optimizer step each.

        ``loss_fn(idx)`` returns a mini-batch's loss and statistics (with ``approx_kl``, the
        mean ½(log π − log π_old)² on its tokens). With ``target_kl``, the passes stop before a step
        on a mini-batch whose ``approx_kl`` already exceeds it: the policy has moved far enough from
        the one that sampled the rollouts. Returns the statistics averaged over the steps taken, or
        None after a non-finite loss (no step taken; ``StopOnNonFinite`` ends the run).
        """
        opt = self.optimizers()
        size = self.mini_batch_size or n
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(self.epochs):
            for idx in torch.randperm(n, device=self.device).split(size):
                loss, stats = loss_fn(idx)
                if not torch.isfinite(loss):
                    self._last_loss = loss.detach()
                    return None
                if target_kl is not None and steps:
                    # every process must take the same decision (DDP steps together): the mean over ranks
                    moved = float(self.trainer.strategy.reduce(stats["approx_kl"].detach(), reduce_op="mean"))
                    if moved > target_kl:
                        return self._averaged(sums, steps, stopped=True)
                opt.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm:
                    self.clip_gradients(
                        opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                opt.step()
                for k, v in {"loss": loss, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
                steps += 1
        return self._averaged(sums, steps, stopped=False)

    @staticmethod
    def _averaged(sums: dict[str, float], steps: int, stopped: bool) -> dict[str, float]:
        return {
            **{k: v / max(steps, 1) for k, v in sums.items()},
            "updates": float(steps),
            "early_stop": float(stopped),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with eval_mode(self):  # dropout off in the updates too: the same function that sampled
            stats = self.iteration(batch)
        if stats is None:
            return self._last_loss
        sched = self.lr_schedulers()
        if (
            sched is not None
        ):  # once per iteration: the run's length in iterations is known, in steps it is not
            sched.step()
        self.history.append(stats)
        n = int(stats.pop("rollouts"))
        shown = ("reward", "kl")
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k not in shown}, batch_size=n)
        self.log_dict({f"train/{k}": stats[k] for k in shown}, prog_bar=True, batch_size=n)
        stats["rollouts"] = n
        return torch.tensor(stats["loss"])

    def iteration(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """One iteration: rollouts, then updates; returns its statistics (``rollouts``, ``reward``,
        ``kl``, ``loss``...), or None after a non-finite loss."""
        raise NotImplementedError

    def rollout_stats(self, ro: Rollout) -> dict[str, float]:
        """What every on-policy objective logs about its rollouts."""
        m = ro.response_mask
        stats = {
            "rollouts": float(len(ro)),
            "reward": float(ro.scores.mean()),
            "reward_std": float(ro.scores.std()) if len(ro) > 1 else 0.0,
            # nats per response, averaged over processes so every rank sees (and controls) the same KL
            "kl": float(self.trainer.strategy.reduce(ro.kl().sum(1).mean(), reduce_op="mean")),
            "entropy": float((ro.entropy * m).sum() / m.sum().clamp_min(1)),
            "response_length": float(m.sum(1).float().mean()),
        }
        if len(ro.components) > 1:
            stats.update({f"reward/{k}": float(v.mean()) for k, v in ro.components.items()})
        return stats

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ro = self.rollout(
            batch["input_ids"],
            batch["attention_mask"],
            batch["prompts"],
            generation_kwargs=self.val_generation_kwargs,
        )
        n = len(ro)
        self.log("val/iteration", float(len(self.history)), batch_size=n)  # iterations trained so far
        self.log("val/reward", ro.scores.mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/kl", ro.kl().sum(1).mean(), batch_size=n, sync_dist=True)
        self.log("val/response_length", ro.response_mask.sum(1).float().mean(), batch_size=n, sync_dist=True)
        if len(ro.components) > 1:
            for k, v in ro.components.items():
                self.log(f"val/reward/{k}", v.mean(), batch_size=n, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        ro = self.rollout(
            batch["input_ids"],
            batch["attention_mask"],
            batch["prompts"],
            generation_kwargs=self.val_generation_kwargs,
        )
        rows = [
            {"prompt": p, "response": t, "reward": float(s)}
            for p, t, s in zip(ro.prompts, ro.texts, ro.scores)
        ]
        for k, v in ro.components.items() if len(ro.components) > 1 else ():
            for row, s in zip(rows, v.tolist()):
                row[f"reward/{k}"] = s
        return rows
