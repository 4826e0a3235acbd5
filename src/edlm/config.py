"""DiffusionConfig: the settings that make a HF checkpoint an edlm model.

Stored inside the checkpoint's own config.json under one key ("edlm"), so a converted model is a
normal transformers checkpoint plus our settings, loaded with one call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

CONFIG_KEY = "edlm"


@dataclass
class DiffusionConfig:
    block_size: int = 32
    mask_token_id: int | None = None
    # shift=True: the logit at i-1 predicts token i (Fast-dLLM v2 / Dream, and every AR model).
    # The paper's best setting is no shift: the logit at i predicts token i.
    shift: bool = False
    # False for a plain AR model driven through the same engine (block size 1, shift, no mask).
    diffusion: bool = True
    base_model: str | None = None
    # The checkpoint's own decode defaults ({"strategy": ..., "threshold": ...}), used wherever a
    # caller sets none (generate, serve, eval), like HF's generation_config: the best measured
    # setting of a model travels with it instead of living in every command line.
    decoding: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def autoregressive(cls, base_model: str | None = None) -> "DiffusionConfig":
        return cls(block_size=1, mask_token_id=None, shift=True, diffusion=False, base_model=base_model)
