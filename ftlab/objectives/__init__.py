"""Objectives: one LightningModule per training objective."""

from ftlab.objectives.causal_lm import CausalLM
from ftlab.objectives.sequence_classifier import SequenceClassifier

__all__ = ["CausalLM", "SequenceClassifier"]
