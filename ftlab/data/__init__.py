"""DataModules, one per data shape; readers with file/line errors in ``_io``."""

from ftlab.data._io import DataError
from ftlab.data.classification import ClassificationData
from ftlab.data.instruction import InstructionData
from ftlab.data.pairs import PairData
from ftlab.data.preference import PreferenceData
from ftlab.data.prompts import PromptData
from ftlab.data.seq2seq import Seq2SeqData
from ftlab.data.text import TextData
from ftlab.data.unpaired import UnpairedPreferenceData

__all__ = ["DataError", "ClassificationData", "InstructionData", "TextData"]
__all__ += ["PairData", "PreferenceData", "UnpairedPreferenceData"]
__all__ += ["PromptData", "Seq2SeqData"]
