"""Mixture-of-experts models: their expert layers, the router's balance loss, sparse upcycling, and
the expert plans TEAM's decoding runs on (arXiv 2602.08404).

Supported: the sparse MoE blocks of transformers 5.x, which all have the same shape: a block with
a `gate` (a top-k router returning `(router_logits, top_k_weights, top_k_index)` from a softmax over
every expert, renormalised over the top k where `norm_topk_prob` is set; Mixtral always) and
`experts` (the fused 3-D expert weights): Qwen3-MoE, Qwen2-MoE (plus its shared expert), OLMoE and
Mixtral, checked on tiny random models of each (tests/test_moe.py). The block is found by that
shape, not by class name, so a family with the same layout works unchanged.

Decoding drives the expert layers through one object per model, `ExpertRouting`, the way a
drafting adapter is driven through its `TokenGate` (edlm.drafter): the seam (edlm.decode.kv.
model_forward) sets an `ExpertPlan` for the length of a forward. With no plan set every block runs
its own forward, so training and every non-MoE path are untouched. A plan counts what the experts
did (distinct experts run per row and layer, token-expert pairs) and may, for its last `tail`
queries (the block being decoded):
- reuse: take the MoE output remembered from the last step instead of running router and experts
  (TEAM's delayed caching; attention is still recomputed);
- cold: let a token choose only among the experts that the row's other computed tokens chose in
  the same forward (TEAM's limited activation): the other routing weights are zeroed, the top k
  taken again and renormalised where the router renormalises.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from edlm.errors import EdlmError


def expert_layers(model) -> list[nn.Module]:
    """The sparse MoE blocks of a HF model, in layer order ([] for a dense model)."""
    return [m for m in model.modules() if _is_expert_block(m)]


def _is_expert_block(module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and hasattr(gate, "top_k") \
        and getattr(gate, "weight", None) is not None and gate.weight.dim() == 2


def is_moe(model) -> bool:
    return bool(expert_layers(model))


def moe_shape(model) -> tuple[int, int]:
    """(experts per layer, experts per token) of an MoE model."""
    gate = expert_layers(model)[0].gate
    return gate.weight.shape[0], gate.top_k


def default_aux_coef(config) -> float:
    """The router balance loss weight a base model was trained with (0.0 for a dense model)."""
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def router_balance_loss(router_logits, model) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over every layer's router logits (transformers' own
    `load_balancing_loss_func`, the one its MoE models add under output_router_logits), over every
    token fed (HF would read a 2-D attention mask for padding; ours is 4-D)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    n_experts, top_k = moe_shape(model)
    return load_balancing_loss_func(tuple(router_logits), n_experts, top_k)


@contextmanager
def router_logits(model, on: bool = True):
    """Collect every router's logits [N, E] of the forwards inside (a list, in layer order; empty when
    off or dense). Hooks, not HF's output_router_logits: that path computes its own balance loss
    from the attention mask, which here is 4-D."""
    captured: list[torch.Tensor] = []
    hooks = [block.gate.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
             for block in (expert_layers(model) if on else [])]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------ sparse upcycling
UPCYCLE_FROM = ("llama", "mistral")


def upcycle(dense, experts: int = 4, top_k: int = 2, seed: int = 0):
    """A Mixtral whose every expert is a copy of the dense model's MLP (sparse upcycling,
    Komatsuzaki et al. 2022): with identical experts and top-k weights that sum to 1 it computes
    exactly the dense model, whatever the router says, so training starts from the parent's
    accuracy; the router (random, std 0.02) and the experts then specialise under training."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dense.config
    if cfg.model_type not in UPCYCLE_FROM:
        raise EdlmError(f"upcycling reads a {' or '.join(UPCYCLE_FROM)} model, got {cfg.model_type!r}")
    if not 1 <= top_k <= experts:
        raise EdlmError(f"upcycling needs 1 <= top_k <= experts, got top_k {top_k} of {experts}")
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "mlp_bias")}
    moe_cfg = MixtralConfig(**{**keep, "num_local_experts": experts, "num_experts_per_tok": top_k,
                               "router_aux_loss_coef": 0.01, "sliding_window": None})
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(moe_cfg).to(dense.dtype)
    state = dense.state_dict()
    out = {}
    for name, value in state.items():
        if ".mlp." not in name:
            out[name] = value
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("gate_proj.weight"):
            up = state[prefix + "up_proj.weight"]
            out[prefix + "experts.gate_up_proj"] = torch.cat([value, up])[None].repeat(experts, 1, 1)
        elif name.endswith("down_proj.weight"):
            out[prefix + "experts.down_proj"] = value[None].repeat(experts, 1, 1)
    for name, value in moe.state_dict().items():
        if name.endswith("mlp.gate.weight"):
            out[name] = torch.randn_like(value) * 0.02
    missing, unexpected = moe.load_state_dict(out, strict=False)
    left = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if left or unexpected:
        raise EdlmError(f"upcycling {cfg.model_type} did not map every weight: missing {left[:3]}, "
                        f"unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()


# ------------------------------------------------------------------ expert plans (decoding)
@dataclass
class ExpertPlan:
    """What the expert layers of one forward do beyond routing as the model would.

    tail: the last `tail` queries may reuse or be cold (the pending clean tokens before them never);
    reuse [B, tail] bool with memo: per layer [B, S, H] outputs from the last step, `slots` [tail]
    saying which memo slot each tail query reads (a block's copies read the same slots); cold
    [B, tail] bool; record: keep each layer's outputs of the tail queries (`outputs`) for the next
    step's memo. activations / pairs [B]: distinct (layer, expert) weights each row ran, and
    token-expert pairs computed, summed over the forward's layers, over the queries `counted`
    [B, Q] (default all; the engine leaves padding out, so a row counts what it would alone).
    """

    rows: int
    tail: int = 0
    reuse: torch.Tensor | None = None
    memo: tuple[torch.Tensor, ...] | None = None
    slots: torch.Tensor | None = None
    cold: torch.Tensor | None = None
    record: bool = False
    counted: torch.Tensor | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    activations: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    _tokens: tuple | None = field(default=None, repr=False)

    def tokens(self, b: int, q: int, device) -> tuple:
        """The forward's flat token view, the same in every expert layer (so built once): the indices
        [N] of the tokens the experts run on (None: all B*Q), and their rows, cold and counted flags
        ([N], the last two None when unset)."""
        if self._tokens is None:
            head = q - self.tail  # queries before the tail: always computed, never cold

            def full(tail_mask):  # [B, tail] -> [B*Q], False on the head
                return torch.cat([torch.zeros(b, head, dtype=torch.bool, device=device), tail_mask], 1).reshape(-1)

            rows = torch.arange(b, device=device).repeat_interleave(q)
            cold = full(self.cold) if self.cold is not None else None
            counted = self.counted.reshape(-1) if self.counted is not None else None
            run = None
            if self.reuse is not None:
                run = (~full(self.reuse)).nonzero()[:, 0]
                rows, cold, counted = (x[run] if x is not None else None for x in (rows, cold, counted))
            self._tokens = (run, rows, cold, counted)
        return self._tokens

    def count(self, rows: torch.Tensor, index: torch.Tensor, n_experts: int, counted=None) -> None:
        """Add one layer's routing (token rows [N], chosen experts [N, k], counted [N] or None) to the counts."""
        if counted is not None:
            rows, index = rows[counted], index[counted]
        hit = torch.zeros(self.rows, n_experts, dtype=torch.bool, device=index.device)
        hit[rows[:, None].expand_as(index), index] = True
        used = hit.sum(-1)
        pairs = torch.bincount(rows, minlength=self.rows) * index.shape[1]
        self.activations = used if self.activations is None else self.activations + used
        self.pairs = pairs if self.pairs is None else self.pairs + pairs


class ExpertRouting:
    """The plan of the forward in flight for one model's expert layers (None: their own forwards)."""

    def __init__(self):
        self.plan: ExpertPlan | None = None
        self.current = None  # (token rows [N], cold [N] or None, counted [N] or None) while a block's router runs

    def planned(self, plan: ExpertPlan | None):
        return _Planned(self, plan)


class _Planned:
    def __init__(self, routing: ExpertRouting, plan):
        self.routing, self.plan = routing, plan

    def __enter__(self):
        self.old, self.routing.plan = self.routing.plan, self.plan
        return self.plan

    def __exit__(self, *exc):
        self.routing.plan = self.old


def routing_of(model) -> ExpertRouting | None:
    """The model's ExpertRouting, installed on first use (None for a dense model)."""
    routing = getattr(model, "_edlm_routing", None)
    if routing is not None:
        return routing or None  # False: looked before, dense
    blocks = expert_layers(model)
    if not blocks:
        object.__setattr__(model, "_edlm_routing", False)  # every decode call asks: scan the modules once
        return None
    routing = ExpertRouting()
    for layer, block in enumerate(blocks):
        block.forward = functools.partial(_block_forward, routing, layer, block.forward)
        block.gate.forward = functools.partial(_router_forward, routing, block.gate, block.gate.forward)
    object.__setattr__(model, "_edlm_routing", routing)  # not a module attribute: never saved
    return routing


def _block_forward(routing: ExpertRouting, layer: int, own, hidden: torch.Tensor) -> torch.Tensor:
    plan = routing.plan
    if plan is None:
        return own(hidden)
    b, q, h = hidden.shape
    head = q - plan.tail
    run, *current = plan.tokens(b, q, hidden.device)
    flat = hidden.reshape(-1, h)
    if run is None:
        out = _routed(routing, own, flat, current)
    else:
        memo = plan.memo[layer][:, plan.slots].to(hidden.dtype)  # [B, tail, H]
        out = torch.cat([hidden.new_zeros(b, head, h), memo], 1).reshape(-1, h).clone()
        if run.numel():
            out[run] = _routed(routing, own, flat[run], current)
    out = out.view(b, q, h)
    if plan.record:
        plan.outputs[layer] = out[:, head:]
    return out


def _routed(routing: ExpertRouting, own, tokens: torch.Tensor, current: list) -> torch.Tensor:
    """The block's own forward on tokens [N, H], its router told their (rows, cold, counted)."""
    routing.current = tuple(current)
    try:
        return own(tokens[None]).reshape(tokens.shape)
    finally:
        routing.current = None


def _router_forward(routing: ExpertRouting, router, own, hidden: torch.Tensor):
    logits, weights, index = own(hidden)
    plan, current = routing.plan, routing.current
    if plan is None or current is None:
        return logits, weights, index
    rows, cold, counted = current
    if cold is not None:
        weights, index = limited_route(router, logits, weights, index, rows, cold, plan.rows, counted)
    plan.count(rows, index, logits.shape[-1], counted)
    return logits, weights, index


def limited_route(router, logits, weights, index, rows, cold, n_rows: int, counted=None):
    """TEAM's limited activation: cold tokens choose among the experts their row's other (computed)
    tokens chose (padding, not `counted`, is no row's). A row with fewer than k such experts leaves
    its cold tokens as they were."""
    n_experts, k = logits.shape[-1], index.shape[-1]
    warm = ~cold if counted is None else ~cold & counted
    allowed = torch.zeros(n_rows, n_experts, dtype=torch.bool, device=logits.device)
    allowed[rows[:, None].expand_as(index)[warm], index[warm]] = True
    limited = cold & (allowed.sum(-1) >= k)[rows]
    probs = torch.softmax(logits.float(), dim=-1).masked_fill(~allowed[rows], 0.0)
    top, choice = probs.topk(k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral renormalises always (no such attribute)
        top = top / top.sum(-1, keepdim=True).clamp_min(1e-20)
    weights = torch.where(limited[:, None], top.to(weights.dtype), weights)
    return weights, torch.where(limited[:, None], choice, index)
