"""edlm: turn a pretrained autoregressive LM into a fast block-diffusion LM."""

from edlm.config import DiffusionConfig
from edlm.errors import EdlmError
from edlm.model import DiffusionLM

__all__ = ["DiffusionConfig", "DiffusionLM", "EdlmError"]
__version__ = "0.1.0"
