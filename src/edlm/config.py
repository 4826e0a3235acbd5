"""DiffusionConfig: the settings that make a HF checkpoint an edlm model.

Stored inside the checkpoint's own config.json under one key ("edlm"), so a converted model is a
normal transformers checkpoint plus our settings, loaded with one call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from edlm.errors import EdlmError

CONFIG_KEY = "edlm"
DEFAULT_BLOCK_SIZE = 32  # the paper evaluates at 16-32; every command that converts uses this


@dataclass
class DiffusionConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    mask_token_id: int | None = None
    # shift=True: the logit at i-1 predicts token i (Fast-dLLM v2 / Dream, and every AR model).
    # The paper's best setting is no shift: the logit at i predicts token i.
    shift: bool = False
    # True: the clean stream of training attends token-causally (not block-causally), so it is an
    # AR model (trained with --ar-loss-weight) and decoding writes finished blocks' KV causally;
    # the `verified` strategy then checks the model's drafts against its own AR argmax.
    causal_clean: bool = False
    # False for a plain AR model driven through the same engine (block size 1, shift, no mask).
    diffusion: bool = True
    base_model: str | None = None
    # The checkpoint's own decode defaults ({"strategy": ..., "threshold": ...}), used wherever a
    # caller sets none (generate, serve, eval), like HF's generation_config: the best measured
    # setting of a model travels with it instead of living in every command line.
    decoding: dict = field(default_factory=dict)
    # A drafting adapter (edlm.drafter): LoRA on noisy positions only, over the parent's own weights
    # ({"rank", "alpha", "targets"}; its weights in drafter.safetensors). None: no adapter.
    drafter: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.check()
        return config

    def check(self) -> None:
        """Types and ranges of a stored config: a hand-edited config.json fails with a clear message."""
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise EdlmError(f"config.json: edlm.block_size must be a positive integer, got {self.block_size!r}")
        if self.mask_token_id is not None and (isinstance(self.mask_token_id, bool)
                                               or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0):
            raise EdlmError(f"config.json: edlm.mask_token_id must be a token id, got {self.mask_token_id!r}")
        for name in ("shift", "diffusion", "causal_clean"):
            if not isinstance(getattr(self, name), bool):
                raise EdlmError(f"config.json: edlm.{name} must be true or false, got {getattr(self, name)!r}")
        if self.drafter is not None and not isinstance(self.drafter, dict):
            raise EdlmError(f"config.json: edlm.drafter must be an object, got {self.drafter!r}")
        if not isinstance(self.decoding, dict):
            raise EdlmError(f"config.json: edlm.decoding must be an object, got {self.decoding!r}")

    @classmethod
    def autoregressive(cls, base_model: str | None = None) -> "DiffusionConfig":
        return cls(block_size=1, mask_token_id=None, shift=True, diffusion=False, base_model=base_model)
