"""Objectives: one LightningModule per training objective."""

from ftlab.objectives.causal_lm import CausalLM
from ftlab.objectives.contrastive import Contrastive
from ftlab.objectives.reward_model import RewardModel
from ftlab.objectives.sequence_classifier import SequenceClassifier
from ftlab.objectives.dpo import DPO
from ftlab.objectives.ppo import PPO
from ftlab.objectives.seq2seq import Seq2SeqLM

__all__ = ["CausalLM", "SequenceClassifier"]
__all__ += ["Contrastive", "RewardModel"]
__all__ += ["DPO", "PPO", "Seq2SeqLM"]
