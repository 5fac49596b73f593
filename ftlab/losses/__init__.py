"""Loss functions as pure functions, shapes in their docstrings."""

from ftlab.losses.contrastive import cosent_loss, cosine_matrix, cosine_regression_loss, info_nce
from ftlab.losses.lm import masked_lm_loss
from ftlab.losses.preference import bradley_terry_loss, pairwise_accuracy
from ftlab.losses.dpo import dpo_logits, dpo_loss, implicit_rewards
from ftlab.losses.ppo import (
    KLController, adaptive_kl_coef, clip_rewards, entropy_from_logits, explained_variance, gae, kl_penalty_rewards,
    masked_mean, masked_var, masked_whiten, ppo_policy_loss, ppo_value_loss, token_logprobs,
)

__all__ = ["masked_lm_loss"]
__all__ += ["info_nce", "cosent_loss", "cosine_regression_loss", "cosine_matrix"]
__all__ += ["bradley_terry_loss", "pairwise_accuracy"]
__all__ += ["dpo_loss", "dpo_logits", "implicit_rewards"]
__all__ += ["gae", "masked_mean", "masked_var", "masked_whiten", "ppo_policy_loss", "ppo_value_loss", "clip_rewards",
            "kl_penalty_rewards", "adaptive_kl_coef", "KLController", "explained_variance", "entropy_from_logits",
            "token_logprobs"]
