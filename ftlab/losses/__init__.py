"""Loss functions as pure functions, shapes in their docstrings."""

from ftlab.losses.contrastive import cosent_loss, cosine_matrix, cosine_regression_loss, info_nce
from ftlab.losses.dpo import dpo_logits, dpo_loss, implicit_rewards
from ftlab.losses.grpo import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    leave_one_out_advantages,
)
from ftlab.losses.kto import kto_loss, kto_reference_point
from ftlab.losses.lm import masked_lm_loss
from ftlab.losses.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs
from ftlab.losses.orpo import log_odds, log_odds_ratio, orpo_loss
from ftlab.losses.ppo import (
    KLController,
    adaptive_kl_coef,
    clip_rewards,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from ftlab.losses.preference import bradley_terry_loss, pairwise_accuracy
from ftlab.losses.simpo import simpo_loss

__all__ = ["masked_lm_loss", "token_logprobs", "sequence_logprobs", "entropy_from_logits"]
__all__ += ["info_nce", "cosent_loss", "cosine_regression_loss", "cosine_matrix"]
__all__ += ["bradley_terry_loss", "pairwise_accuracy"]
__all__ += [
    "dpo_loss",
    "dpo_logits",
    "implicit_rewards",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "log_odds",
    "log_odds_ratio",
    "simpo_loss",
]
__all__ += [
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "clip_rewards",
    "kl_penalty_rewards",
    "adaptive_kl_coef",
    "KLController",
    "explained_variance",
]
__all__ += ["group_advantages", "leave_one_out_advantages", "k3_kl", "clipped_policy_loss", "aggregate"]
