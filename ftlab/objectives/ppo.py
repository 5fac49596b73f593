"""PPO against a reward model or a reward function: the RL step of RLHF.

Ziegler et al. (2019, arXiv:1909.08593), InstructGPT (Ouyang et al., 2022); the update rules are
in ``ftlab.losses.ppo``. One training step is one PPO iteration:

1. rollouts: ``num_rollouts`` responses sampled from the policy for the batch's prompts (cycled
   when there are fewer prompts: several samples each), generated ``chunk_size`` at a time;
2. scores from the reward(s) (``ftlab.rewards``), clipped to ``±cliprange_reward``;
3. per-token rewards ``−β (log π_old − log π_ref)`` plus the score on the last token, where the
   reference ``π_ref`` is the *same* model with the method switched off (one frozen base in
   memory); ``β`` follows the adaptive KL controller (``init_kl_coef``, ``target``, ``horizon``);
4. advantages by GAE (``gamma``, ``lam``), whitened;
5. ``ppo_epochs`` passes over the rollouts in mini-batches: clipped policy loss (``cliprange``)
   plus ``vf_coef`` × clipped value loss (``cliprange_value``), one optimizer step each. The
   passes stop early once the policy has moved ``target_kl`` from the one that sampled the
   rollouts, so bound a run in iterations (``trainer.limit_train_batches``, ``max_epochs``).

Why ``target_kl``: clipping the ratio zeroes the gradient of a token that left ``[1 − ε, 1 + ε]``,
but the shared weights keep moving it through every other token's gradient. Measured on the
tests' task (tiny-llama, LoRA, Adam at 3e-3, 4 epochs × 2 mini-batches), the policy moved
½(Δ log π)² ≈ 0.2–1.4 nats per token per iteration — far outside the clip range — and on 2 of 16
seeds the KL to the reference ran away to 20–30 nats (45.9 on an AMD EPYC CPU) once the reward
saturated: whitened advantages then hold only noise, which Adam turns into full-size steps. The
KL check bounds that drift per iteration whatever the float rounding (``experiments/ppo_stability``).

After an SFT step, ``base_adapter: <the SFT run's adapter>`` folds it into the base weights: the
policy starts from the SFT model and the reference is the SFT model too (as in InstructGPT), while
a fresh ``method`` trains beside it (``experiments/rlhf_pipeline``). Starting from the SFT adapter
with ``adapter`` instead trains that adapter further, and the reference is the base *without* it.

The value head is a linear map on the policy's last hidden state: it shares the trunk, trains
with the method's parameters and is saved with the adapter. Logged: ``train/reward``,
``train/kl``, ``train/kl_coef``, ``train/entropy``, ``train/clip_frac``, ``train/approx_kl``,
``train/value_loss``, ``train/policy_loss``, ``train/explained_variance``, ``train/response_length``;
``val/reward`` and ``val/kl`` on validation prompts (and ``*/reward/<name>`` per reward source).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ftlab.losses.ppo import (
    KLController,
    clip_rewards,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from ftlab.models.backbone import Backbone
from ftlab.objectives._online import OnlineObjective
from ftlab.peft.method import Method
from ftlab.rollouts import response_logprobs


class PPO(OnlineObjective):
    """Proximal policy optimisation of a causal LM against a reward.

    Args:
        backbone: The policy's base model (causal LM); also the reference policy.
        method: How the policy adapts it; it must be switchable off (LoRA, QLoRA, Adapter,
            PrefixTuning, PromptTuning) since the reference policy is the frozen base.
        optimizer: Optimizer class and arguments (method parameters and value head).
        scheduler: Learning-rate scheduler, stepped once per iteration.
        adapter: Start from a saved adapter (e.g. the SFT run's) instead of a fresh method.
        base_adapter: A ``CausalLM`` run's adapter (the SFT step's) folded into the backbone's weights
            before ``method`` is applied: the SFT model becomes the base, so the policy starts from it
            and the reference is the SFT model, not the pretrained one.
        max_length: Prompt tokens (linked from the data); with ``max_new_tokens`` it must fit the model.
        reward_fn: Import path of a reward function ``f(prompts, responses, **reward_kwargs)`` returning
            one number per response (e.g. ``ftlab.rewards.has_char``).
        reward_model: Directory of an ftlab ``RewardModel`` adapter (what its run saved), used instead
            of ``reward_fn``. Its tokenizer must be the policy's.
        reward_backbone: The reward model's backbone; default: the base named in its adapter file.
        reward_kwargs: Keyword arguments of ``reward_fn``, or of ``RewardModel`` (e.g. ``pooling``).
        rewards: More reward sources, summed with weights (see ``ftlab.rewards.Rewards``), e.g.
            ``[{model: runs/rm/adapter}, {fn: ftlab.rewards.instruction_following, weight: 0}]``;
            a weight of 0 logs a source without optimising it.
        num_rollouts: Rollouts per PPO iteration; default: one per prompt of the batch.
        chunk_size: Rollouts generated (and scored) at once.
        mini_batch_size: Rollouts per optimizer step; default: all of them.
        ppo_epochs: Passes over each iteration's rollouts.
        max_new_tokens: Response budget in tokens.
        generation_kwargs: Extra ``generate`` arguments; sampling defaults to pure ancestral sampling
            (``do_sample: true, top_k: 0, top_p: 1.0``), which keeps the rollouts on-policy.
        val_generation_kwargs: ``generate`` arguments for validation and predict (default: as in training;
            ``{do_sample: false}`` scores greedy answers).
        init_kl_coef: Starting KL penalty coefficient β.
        target: KL target (nats per response) of the adaptive controller; null keeps β fixed.
        horizon: Adaptive controller horizon, in rollouts.
        gamma: GAE discount.
        lam: GAE λ.
        cliprange: Policy ratio clip ε.
        cliprange_value: Value clip ε_v (reward units).
        cliprange_reward: Scores are clipped to ``±cliprange_reward`` (null: no clipping).
        vf_coef: Weight of the value loss.
        target_kl: Stop an iteration's passes once a mini-batch's ½ mean (log π − log π_old)² exceeds
            this (nats per token); null: always run all ``ppo_epochs``.
        whiten_advantages: Normalise advantages to zero mean and unit variance per iteration.
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
        base_adapter: str | None = None,
        max_length: int | None = None,
        reward_fn: str | None = None,
        reward_model: str | None = None,
        reward_backbone: Backbone | None = None,
        reward_kwargs: dict[str, Any] | None = None,
        rewards: list[dict[str, Any]] | None = None,
        num_rollouts: int | None = None,
        chunk_size: int = 16,
        mini_batch_size: int | None = None,
        ppo_epochs: int = 4,
        max_new_tokens: int = 32,
        generation_kwargs: dict[str, Any] | None = None,
        val_generation_kwargs: dict[str, Any] | None = None,
        init_kl_coef: float = 0.05,
        target: float | None = 6.0,
        horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        cliprange_reward: float | None = 10.0,
        vf_coef: float = 0.1,
        target_kl: float | None = 0.1,
        whiten_advantages: bool = True,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(
            backbone,
            method,
            optimizer,
            scheduler,
            adapter,
            max_length,
            reward_fn=reward_fn,
            reward_model=reward_model,
            reward_backbone=reward_backbone,
            reward_kwargs=reward_kwargs,
            rewards=rewards,
            chunk_size=chunk_size,
            mini_batch_size=mini_batch_size,
            epochs=ppo_epochs,
            max_new_tokens=max_new_tokens,
            generation_kwargs=generation_kwargs,
            val_generation_kwargs=val_generation_kwargs,
            max_grad_norm=max_grad_norm,
            base_adapter=base_adapter,
        )
        if (num_rollouts or 1) <= 0:
            raise ValueError(f"num_rollouts must be > 0, got {num_rollouts}")
        if target_kl is not None and target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 (or null), got {target_kl}")
        self.num_rollouts, self.ppo_epochs = num_rollouts, ppo_epochs
        self.kl_ctl = KLController(init_kl_coef, target, horizon)
        self.gamma, self.lam, self.cliprange, self.cliprange_value = gamma, lam, cliprange, cliprange_value
        self.cliprange_reward, self.vf_coef = cliprange_reward, vf_coef
        self.target_kl, self.whiten_advantages = target_kl, whiten_advantages
        self.value_head: nn.Module | None = None

    def build(self):
        model = super().build()
        self.value_head = nn.Linear(model.config.hidden_size, 1).to(dtype=next(model.parameters()).dtype)
        nn.init.zeros_(
            self.value_head.weight
        )  # values start at 0: no random critic noise in the first advantages
        nn.init.zeros_(self.value_head.bias)
        return model

    def value_fn(self):
        return lambda hidden: self.value_head(hidden).squeeze(-1).float()  # (n, R, H) -> (n, R)

    def _stats(self, ro, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log π (with gradient) and values of the rollouts ``idx`` now: (n, R) each."""
        out = response_logprobs(
            self.model,
            ro.seq[idx],
            ro.mask[idx],
            ro.responses[idx],
            ro.prompt_len,
            self.temperature,
            hidden=True,
        )
        return out["logprobs"], self.value_fn()(out["hidden"])

    # ------------------------------------------------------------------ PPO iteration
    def iteration(self, batch: dict[str, Any]) -> dict[str, float] | None:
        ro = self.rollout(
            batch["input_ids"],
            batch["attention_mask"],
            batch["prompts"],
            n=self.num_rollouts or batch["input_ids"].size(0),
        )
        rmask = ro.response_mask
        scores = clip_rewards(ro.scores, self.cliprange_reward)
        rewards, _ = kl_penalty_rewards(scores, ro.logprobs, ro.ref_logprobs, rmask, self.kl_ctl.value)
        advantages, returns = gae(rewards, ro.values, rmask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, rmask)

        def loss_fn(idx: torch.Tensor):
            logprobs, values = self._stats(ro, idx)
            m = rmask[idx]
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(
                logprobs, ro.logprobs[idx], advantages[idx], m, self.cliprange
            )
            vf_loss, vf_clip = ppo_value_loss(values, ro.values[idx], returns[idx], m, self.cliprange_value)
            return pg_loss + self.vf_coef * vf_loss, {
                "policy_loss": pg_loss,
                "value_loss": vf_loss,
                "clip_frac": clip_frac,
                "value_clip_frac": vf_clip,
                "approx_kl": approx_kl,
            }

        updates = self.update(len(ro), loss_fn, self.target_kl)
        if updates is None:
            return None
        stats = {
            **self.rollout_stats(ro),
            "kl_coef": self.kl_ctl.value,
            "explained_variance": float(explained_variance(ro.values, returns, rmask)),
            **updates,
        }
        self.kl_ctl.update(stats["kl"], len(ro))
        return stats

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_coef"] = self.kl_ctl.value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_ctl.value = float(checkpoint.get("ppo_kl_coef", self.kl_ctl.value))
