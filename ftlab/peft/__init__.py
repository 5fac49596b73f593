"""Methods: how a backbone is adapted. One file per method; see ``_method.Method`` for the contract."""

from ftlab.peft._method import Method, count_parameters
from ftlab.peft._targets import TargetError
from ftlab.peft.adapter import Adapter
from ftlab.peft.full import Full
from ftlab.peft.longlora import LongLoRA
from ftlab.peft.lora import LoRA, LoRALinear
from ftlab.peft.prefix import PrefixTuning
from ftlab.peft.prompt import PromptTuning
from ftlab.peft.qlora import QLoRA

__all__ = [
    "Method", "count_parameters", "TargetError",
    "Full", "LoRA", "LoRALinear", "QLoRA", "LongLoRA", "PromptTuning", "PrefixTuning", "Adapter",
]
