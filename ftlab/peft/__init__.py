"""Methods: how a backbone is adapted. One file per method; see ``_method.Method`` for the contract."""

from ftlab.peft._method import Method, count_parameters
from ftlab.peft._targets import TargetError
from ftlab.peft.full import Full
from ftlab.peft.lora import LoRA, LoRALinear

__all__ = ["Method", "Full", "LoRA", "LoRALinear", "TargetError", "count_parameters"]
