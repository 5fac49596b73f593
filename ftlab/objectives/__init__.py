"""Objectives: one LightningModule per training objective."""

from ftlab.objectives.causal_lm import CausalLM
from ftlab.objectives.contrastive import Contrastive
from ftlab.objectives.dpo import DPO
from ftlab.objectives.grpo import GRPO
from ftlab.objectives.kto import KTO
from ftlab.objectives.orpo import ORPO
from ftlab.objectives.ppo import PPO
from ftlab.objectives.reward_model import RewardModel
from ftlab.objectives.rloo import RLOO
from ftlab.objectives.seq2seq import Seq2SeqLM
from ftlab.objectives.sequence_classifier import SequenceClassifier
from ftlab.objectives.simpo import SimPO

__all__ = ["CausalLM", "SequenceClassifier"]
__all__ += ["Contrastive", "RewardModel"]
__all__ += ["DPO", "KTO", "ORPO", "SimPO"]
__all__ += ["GRPO", "PPO", "RLOO"]
__all__ += ["Seq2SeqLM"]
