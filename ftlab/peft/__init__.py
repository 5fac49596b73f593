"""Methods: how a backbone is adapted. One file per method; ``ftlab.peft.method.Method`` is the contract."""

from ftlab.peft.adapter import Adapter
from ftlab.peft.dora import DoRA
from ftlab.peft.full import Full
from ftlab.peft.ia3 import IA3
from ftlab.peft.longlora import LongLoRA
from ftlab.peft.lora import LoRA, LoRALinear
from ftlab.peft.loraplus import LoRAPlus
from ftlab.peft.method import Method, MethodError, count_parameters
from ftlab.peft.prefix import PrefixTuning
from ftlab.peft.prompt import PromptTuning
from ftlab.peft.qlora import QLoRA
from ftlab.peft.targets import TargetError

__all__ = [
    "Method",
    "MethodError",
    "count_parameters",
    "TargetError",
    "Full",
    "LoRA",
    "LoRALinear",
    "DoRA",
    "LoRAPlus",
    "QLoRA",
    "LongLoRA",
    "IA3",
    "PromptTuning",
    "PrefixTuning",
    "Adapter",
]
