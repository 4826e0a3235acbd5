"""Sibling projections that read one input, run as one GEMM (inference: DiffusionLM.compile).

Why: HF's Llama-family layers call q_proj, k_proj and v_proj on the same tensor, and gate_proj and
up_proj too, so one GEMM over the stacked weights [Wq ; Wk ; Wv] gives all three (gpt-fast's `wqkv`):
7 GEMMs a layer become 4. A drafting adapter (edlm.drafter.GatedLoRA) stacks its A's beside the W's
in the same GEMM, so its 14 GEMMs a layer become 11. At a decode step's few rows a GEMM costs
mostly the reading of its weights and the call around it, so fewer calls over the same weights
save the calls: a compiled forward of the demo dLM on a CPU, 5% at batch 1 and nothing at batch 8
(bench/forward.py); on a GPU, where small batches are launch-bound, fewer kernels count for more.

How, without touching HF's attention code or the checkpoint's names: the first sibling (the lead)
runs the group's GEMM, returns its own slice and leaves the others' slices for them, keyed by the
input tensor itself; a sibling called with another input, or with autograd on, or on a device or
dtype the stacked weight no longer fits, runs its own layer as before. Every weight becomes a view
of its group's stacked tensor (a non-persistent buffer of the lead layer, `fused_weight`, so that
an exported program names it by its module path: edlm.aot), so no memory is added and in-place
writes (load_state_dict, an optimizer step) reach the fused GEMM; a weight given new storage of the same dtype and device
(`load_state_dict(assign=True)`, `.data =`) would not: fuse after loading, as compile does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # read the same input, in this order


class FusedGroup:
    """One stacked GEMM for sibling layers: all plain nn.Linear, or all GatedLoRA (`is_adapter`; their A's are
    stacked after the W's; each B then runs on its own slice of the A's output)."""

    def __init__(self, layers: list[nn.Module]):
        self.adapted = is_adapter(layers[0])
        # the stacked tensors are non-persistent buffers of the lead layer, read through it: an
        # exported program (edlm.aot) then names them by their module path and can share them
        self.lead, self.b_layers = layers[0], [m.lora_b for m in layers] if self.adapted else []
        bases = [m.base if self.adapted else m for m in layers]
        self.sizes = [b.out_features for b in bases]
        self.width = sum(self.sizes)  # rows of the stacked W (the A's follow)
        weights = [b.weight for b in bases] + ([m.lora_a.weight for m in layers] if self.adapted else [])
        with torch.no_grad():
            rows = [w.shape[0] for w in weights]
            weight = weights[0].new_empty(sum(rows), weights[0].shape[1])  # [width (+ n * rank), in]
            _become_views(weights, weight, rows)
            self.lead.register_buffer("fused_weight", weight, persistent=False)
            bias = None  # [width (+ n * rank)]: zeros for a layer without one and for the A rows
            if any(b.bias is not None for b in bases):
                bias = weight.new_zeros(weight.shape[0])
                _become_views([b.bias for b in bases], bias, self.sizes)
            self.lead.register_buffer("fused_bias", bias, persistent=False)
            if self.adapted:
                self.gate, self.scale = layers[0].gate, layers[0].scale
                self.rank = layers[0].lora_a.out_features
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)

    @property
    def weight(self) -> torch.Tensor:
        return self.lead.fused_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lead.fused_bias

    @property
    def lora_b(self) -> list[torch.Tensor]:
        return [m.weight for m in self.b_layers]

    def fits(self, x: torch.Tensor) -> bool:
        return not torch.is_grad_enabled() and x.device == self.weight.device and x.dtype == self.weight.dtype

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The lead's call: every sibling's output from one GEMM (plus the B's); returns the lead's."""
        if not self.adapted or self.gate.value_for(x) is None:  # the W rows alone (the parent's forward)
            outs = F.linear(x, self.weight[: self.width],
                            None if self.bias is None else self.bias[: self.width]).split(self.sizes, -1)
        else:
            out, low = F.linear(x, self.weight, self.bias).split([self.width, self.weight.shape[0] - self.width], -1)
            # each B on its own slice of A's output (one block-diagonal GEMM: 3x the FLOPs, measured
            # slower; a bmm of equal-sized B's: measured no faster)
            deltas = [F.linear(lo, b) for lo, b in zip(low.split(self.rank, -1), self.lora_b, strict=True)]
            outs = [self.gate.add(o, d, self.scale) for o, d in zip(out.split(self.sizes, -1), deltas, strict=True)]
        self.input, self.outputs = x, [None, *outs[1:]]
        return outs[0]

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """A sibling's slice of the lead's GEMM on this very input, once; None: run your own layer."""
        out = self.outputs[index] if self.input is x else None
        if out is not None:
            self.outputs[index] = None
            if not any(o is not None for o in self.outputs):
                self.input = None  # no reference kept past the forward
        return out


class FusedLinear(nn.Linear):
    """An nn.Linear in a FusedGroup (its class swapped in place: names, weights and state_dict stay)."""

    fused: tuple[FusedGroup, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_call(self, x)
        return super().forward(x) if out is None else out


def fused_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through its group, or None when it must run on its own."""
    group, index = getattr(layer, "fused", (None, 0))
    if group is None or not group.fits(x):
        return None
    return group.run(x) if index == 0 else group.take(index, x)


def is_adapter(layer: nn.Module) -> bool:
    """An edlm.drafter.GatedLoRA (told by its parts: that module imports this one)."""
    return all(hasattr(layer, part) for part in ("base", "lora_a", "lora_b", "gate", "scale"))


def fuse(model: nn.Module) -> int:
    """Group q/k/v and gate/up siblings (and each drafter layer with itself); returns the groups made.
    A group needs every sibling of one kind, one input width and one device and dtype; a drafter
    layer on a CPU in bf16/fp16 stays alone (its A runs in fp32 there: GatedLoRA.delta)."""
    def fusable(layers):
        kinds = {type(m) for m in layers}
        if len(kinds) != 1 or not (kinds == {nn.Linear} or is_adapter(layers[0])):
            return False
        if any(id(m) in taken or hasattr(m, "fused") for m in layers):
            return False
        w = [m.base.weight if is_adapter(m) else m.weight for m in layers]
        if len({(t.shape[1], t.device, t.dtype) for t in w}) != 1:
            return False
        return not (is_adapter(layers[0]) and w[0].device.type == "cpu" and w[0].dtype in (torch.bfloat16, torch.float16))

    groups, taken = [], set()
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, nn.Module) for m in layers) and fusable(layers):
                groups.append(layers)
                taken.update(id(m) for m in layers)
    for layer in model.modules():  # a drafter's o_proj / down_proj: its W and A in one GEMM
        if is_adapter(layer) and fusable([layer]):
            groups.append([layer])
    for layers in groups:
        group = FusedGroup(layers)
        for i, layer in enumerate(layers):
            if type(layer) is nn.Linear:
                layer.__class__ = FusedLinear
            layer.fused = (group, i)
    return len(groups)


def _become_views(tensors: list[torch.Tensor | None], stacked: torch.Tensor, rows: list[int]) -> None:
    """Copy each tensor into its `rows` of `stacked` (in order; None: rows left as they are) and make
    it a view of them: no second copy kept, writes shared."""
    start = 0
    for t, n in zip(tensors, rows, strict=True):
        if t is not None:
            stacked[start: start + n] = t
            t.data = stacked[start: start + n]
        start += n

