"""edlm: turn a pretrained autoregressive LM into a fast block-diffusion LM.

`DiffusionLM` and `DiffusionConfig` load on first use: `edlm --help` and a Ctrl-C during start-up
must not wait for torch and transformers to import.
"""

from edlm.errors import EdlmError

__all__ = ["DiffusionConfig", "DiffusionLM", "EdlmError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "DiffusionLM":
        from edlm.model import DiffusionLM

        return DiffusionLM
    if name == "DiffusionConfig":
        from edlm.config import DiffusionConfig

        return DiffusionConfig
    raise AttributeError(f"module 'edlm' has no attribute {name!r}")
