"""Loss functions as pure functions, shapes in their docstrings."""

from ftlab.losses.lm import masked_lm_loss, sequence_logprobs

__all__ = ["masked_lm_loss", "sequence_logprobs"]
