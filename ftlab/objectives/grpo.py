"""GRPO: group relative policy optimisation, PPO without a critic.

GRPO (Shao et al., 2024, arXiv:2402.03300, DeepSeekMath); the pure functions are in
``ftlab.losses.grpo``. One training step is one iteration:

1. rollouts: ``num_generations`` responses sampled for each prompt of the batch (a *group*);
2. scores from the reward(s) (``ftlab.rewards``); with ``kl_penalty: reward`` the sequence KL
   ``β Σ_t (log π_old − log π_ref)`` is subtracted from each score;
3. advantages from the group alone, no value head:
       group           A_i = (r_i − mean_j r_j) / (std_j r_j + eps)   (``scale_rewards: false``: no std)
       leave_one_out   A_i = r_i − mean_{j≠i} r_j                     (RLOO, ``ftlab.objectives.RLOO``)
   every token of response i gets A_i;
4. ``epochs`` passes over the rollouts in mini-batches, one optimizer step each, minimising
       L = agg(max(−A ρ_t, −A clip(ρ_t, 1 ± ε))) + β agg(k3_t)     (``kl_penalty: k3``)
   with ρ_t = π/π_old per token and ``agg`` the mean over tokens (``token``) or per response then
   over responses (``sequence``, the paper's).

The reference ``π_ref`` is the frozen base (the same model with the method switched off). A
group whose responses all score the same teaches nothing (advantages 0); the share of such groups
is logged as ``train/zero_std_groups``. Logged as well: ``train/reward`` (mean), ``train/reward_std``,
``train/kl`` (nats per response), ``train/clip_frac``, ``train/approx_kl``, ``train/entropy``,
``train/response_length``; ``val/reward``, ``val/kl``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.grpo import (
    Aggregation,
    aggregate,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    leave_one_out_advantages,
)
from ftlab.models.backbone import Backbone
from ftlab.objectives._online import OnlineObjective
from ftlab.peft.method import Method
from ftlab.rollouts import response_logprobs

Advantage = Literal["group", "leave_one_out"]
KLPenalty = Literal["k3", "reward"]


class GRPO(OnlineObjective):
    """Group relative policy optimisation (no value head) of a causal LM against a reward.

    Args:
        backbone: The policy's base model (causal LM); also the reference policy.
        method: How the policy adapts it; it must be switchable off (LoRA, QLoRA, Adapter,
            PrefixTuning, PromptTuning) since the reference policy is the frozen base.
        optimizer: Optimizer class and arguments (the method's parameters).
        scheduler: Learning-rate scheduler, stepped once per iteration.
        adapter: Start from a saved adapter instead of a fresh method.
        base_adapter: A ``CausalLM`` run's adapter (the SFT step's) folded into the backbone's weights
            before ``method`` is applied: the SFT model becomes the base, so the policy starts from it
            and the reference is the SFT model, not the pretrained one.
        max_length: Prompt tokens (linked from the data); with ``max_new_tokens`` it must fit the model.
        reward_fn: Import path of a reward function ``f(prompts, responses, **reward_kwargs)``.
        reward_model: Directory of an ftlab ``RewardModel`` adapter; its tokenizer must be the policy's.
        reward_backbone: The reward model's backbone; default: the base named in its adapter file.
        reward_kwargs: Keyword arguments of ``reward_fn``, or of ``RewardModel``.
        rewards: More reward sources, summed with weights (see ``ftlab.rewards.Rewards``); weight 0:
            logged only.
        num_generations: Responses per prompt (the group size G ≥ 2); an iteration has batch × G rollouts.
        chunk_size: Rollouts generated (and scored) at once.
        mini_batch_size: Rollouts per optimizer step; default: all of them.
        epochs: Passes over each iteration's rollouts (1: every step is on-policy and ρ = 1).
        max_new_tokens: Response budget in tokens.
        generation_kwargs: Extra ``generate`` arguments; default: pure ancestral sampling.
        val_generation_kwargs: ``generate`` arguments for validation and predict (default: as in training).
        beta: KL coefficient β (0: no KL term, and the reference is only used for logging).
        kl_penalty: ``k3``: β × the k3 estimator as a loss term; ``reward``: β × the sequence KL
            subtracted from the reward before the baseline.
        advantage: ``group`` (GRPO) or ``leave_one_out`` (RLOO).
        scale_rewards: Divide group-centred rewards by the group's std (``group`` only; false: Dr. GRPO).
        cliprange: Policy ratio clip ε.
        loss_aggregation: ``sequence`` (mean per response, then over responses) or ``token`` (mean over
            all response tokens of the mini-batch).
        target_kl: Stop an iteration's passes once a mini-batch's ½ mean (log π − log π_old)² exceeds
            this (nats per token); null: always run all ``epochs``.
        max_grad_norm: Gradient-norm clip per optimizer step (null: none).
    """

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
        num_generations: int = 8,
        chunk_size: int = 32,
        mini_batch_size: int | None = None,
        epochs: int = 1,
        max_new_tokens: int = 32,
        generation_kwargs: dict[str, Any] | None = None,
        val_generation_kwargs: dict[str, Any] | None = None,
        beta: float = 0.04,
        kl_penalty: KLPenalty = "k3",
        advantage: Advantage = "group",
        scale_rewards: bool = True,
        cliprange: float = 0.2,
        loss_aggregation: Aggregation = "sequence",
        target_kl: float | None = None,
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
            epochs=epochs,
            max_new_tokens=max_new_tokens,
            generation_kwargs=generation_kwargs,
            val_generation_kwargs=val_generation_kwargs,
            max_grad_norm=max_grad_norm,
            base_adapter=base_adapter,
        )
        name = type(self).__name__
        if num_generations < 2:
            raise ValueError(
                f"{name}: num_generations must be >= 2, got {num_generations}: the baseline of a "
                "response is the other responses to the same prompt, so a group of 1 has none"
            )
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if kl_penalty not in ("k3", "reward"):
            raise ValueError(f"unknown kl_penalty {kl_penalty!r}; use 'k3' or 'reward'")
        if advantage not in ("group", "leave_one_out"):
            raise ValueError(f"unknown advantage {advantage!r}; use 'group' or 'leave_one_out'")
        if loss_aggregation not in ("sequence", "token"):
            raise ValueError(f"unknown loss_aggregation {loss_aggregation!r}; use 'sequence' or 'token'")
        if target_kl is not None and target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 (or null), got {target_kl}")
        self.num_generations, self.beta, self.kl_penalty = num_generations, beta, kl_penalty
        self.advantage, self.scale_rewards, self.cliprange = advantage, scale_rewards, cliprange
        self.loss_aggregation, self.target_kl = loss_aggregation, target_kl

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) rewards, groups contiguous -> (N,) advantages."""
        if self.advantage == "leave_one_out":
            return leave_one_out_advantages(scores, self.num_generations)
        return group_advantages(scores, self.num_generations, scale=self.scale_rewards)

    def iteration(self, batch: dict[str, Any]) -> dict[str, float] | None:
        ro = self.rollout(
            batch["input_ids"], batch["attention_mask"], batch["prompts"], repeats=self.num_generations
        )
        rmask = ro.response_mask
        scores = ro.scores
        if self.kl_penalty == "reward" and self.beta:
            scores = scores - self.beta * ro.kl().sum(1)  # (N,)
        adv = self.advantages(scores)  # (N,)
        how = self.loss_aggregation

        def loss_fn(idx: torch.Tensor):
            logprobs = response_logprobs(
                self.model, ro.seq[idx], ro.mask[idx], ro.responses[idx], ro.prompt_len, self.temperature
            )["logprobs"]
            m = rmask[idx]
            pg_loss, clip_frac, approx_kl = clipped_policy_loss(
                logprobs, ro.logprobs[idx], adv[idx], m, self.cliprange, how
            )
            kl = aggregate(k3_kl(logprobs, ro.ref_logprobs[idx]), m, how)
            loss = pg_loss + self.beta * kl if self.kl_penalty == "k3" else pg_loss
            return loss, {"policy_loss": pg_loss, "k3_kl": kl, "clip_frac": clip_frac, "approx_kl": approx_kl}

        updates = self.update(len(ro), loss_fn, self.target_kl)
        if updates is None:
            return None
        groups = ro.scores.view(-1, self.num_generations)
        return {
            **self.rollout_stats(ro),
            **updates,
            "zero_std_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "advantage_abs": float(adv.abs().mean()),
        }
