"""ftlab: fine-tuning methods x objectives x data, composed in one YAML and run by Lightning.

Kept import-free so ``ftlab --help`` starts fast; import ``ftlab.peft``, ``ftlab.objectives``,
``ftlab.data`` for the parts.
"""

__version__ = "0.1.0"
