"""DataModules, one per data shape; readers with file/line errors in ``_io``."""

from ftlab.data._io import DataError
from ftlab.data.classification import ClassificationData
from ftlab.data.instruction import InstructionData
from ftlab.data.text import TextData

__all__ = ["DataError", "ClassificationData", "InstructionData", "TextData"]
