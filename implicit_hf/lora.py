"""Deprecated alias of `implicit_hf.integrations.peft` (PEFT LoRA for implicit models), kept so that
``from implicit_hf.lora import ...`` goes on working; it will be removed in a later release."""

import warnings

from .integrations.peft import *  # noqa: F403
from .integrations.peft import __all__  # noqa: F401

warnings.warn(
    "implicit_hf.lora is deprecated: import from implicit_hf.integrations.peft instead",
    DeprecationWarning,
    stacklevel=2,
)
