"""RLOO: REINFORCE with a leave-one-out baseline, critic-free like GRPO.

RLOO (Ahmadian et al., 2024, arXiv:2402.14740, "Back to Basics"). For k responses to a prompt
with KL-penalised sequence rewards ``r_i = score_i − β Σ_t (log π_old − log π_ref)``:

    A_i = r_i − 1/(k−1) Σ_{j≠i} r_j          L = −mean A_i log π(y_i | x)

The baseline of a response is the mean reward of the *other* responses to its prompt, so it is
unbiased without a value head; the KL penalty sits in the reward, as in the paper. This is
``GRPO`` with ``advantage: leave_one_out``, ``kl_penalty: reward`` and per-token averaging; with
one pass over each iteration's rollouts (``epochs: 1``) the clipped ratio is exactly 1 and the
gradient is REINFORCE's. More epochs turn it into the clipped (PPO-style) variant TRL runs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ftlab.losses.grpo import Aggregation
from ftlab.models.backbone import Backbone
from ftlab.objectives.grpo import GRPO, Advantage, KLPenalty
from ftlab.peft.method import Method


class RLOO(GRPO):
    """REINFORCE leave-one-out of a causal LM against a reward (no value head).

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
        num_generations: Responses per prompt (k ≥ 2); an iteration has batch × k rollouts.
        chunk_size: Rollouts generated (and scored) at once.
        mini_batch_size: Rollouts per optimizer step; default: all of them.
        epochs: Passes over each iteration's rollouts (1: plain REINFORCE).
        max_new_tokens: Response budget in tokens.
        generation_kwargs: Extra ``generate`` arguments; default: pure ancestral sampling.
        val_generation_kwargs: ``generate`` arguments for validation and predict (default: as in training).
        beta: KL coefficient β.
        kl_penalty: ``reward`` (the paper's: in the sequence reward) or ``k3`` (a loss term, as GRPO).
        advantage: ``leave_one_out`` (RLOO) or ``group`` (GRPO's normalisation).
        scale_rewards: With ``advantage: group`` only: divide by the group's std.
        cliprange: Policy ratio clip ε (inactive with ``epochs: 1``).
        loss_aggregation: ``token`` (mean over response tokens) or ``sequence``.
        target_kl: Stop an iteration's passes once a mini-batch's ½ mean (log π − log π_old)² exceeds this.
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
        num_generations: int = 4,
        chunk_size: int = 32,
        mini_batch_size: int | None = None,
        epochs: int = 1,
        max_new_tokens: int = 32,
        generation_kwargs: dict[str, Any] | None = None,
        val_generation_kwargs: dict[str, Any] | None = None,
        beta: float = 0.05,
        kl_penalty: KLPenalty = "reward",
        advantage: Advantage = "leave_one_out",
        scale_rewards: bool = False,
        cliprange: float = 0.2,
        loss_aggregation: Aggregation = "token",
        target_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(
            backbone=backbone,
            method=method,
            optimizer=optimizer,
            scheduler=scheduler,
            adapter=adapter,
            base_adapter=base_adapter,
            max_length=max_length,
            reward_fn=reward_fn,
            reward_model=reward_model,
            reward_backbone=reward_backbone,
            reward_kwargs=reward_kwargs,
            rewards=rewards,
            num_generations=num_generations,
            chunk_size=chunk_size,
            mini_batch_size=mini_batch_size,
            epochs=epochs,
            max_new_tokens=max_new_tokens,
            generation_kwargs=generation_kwargs,
            val_generation_kwargs=val_generation_kwargs,
            beta=beta,
            kl_penalty=kl_penalty,
            advantage=advantage,
            scale_rewards=scale_rewards,
            cliprange=cliprange,
            loss_aggregation=loss_aggregation,
            target_kl=target_kl,
            max_grad_norm=max_grad_norm,
        )
