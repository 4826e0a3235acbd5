"""The one seam between decoding and the model: `model_forward`, and the cache rows it writes.

Every decoder and the likelihood scorer call the model through `model_forward` (gpt-fast's
`model_forward`): masks in the backend's form, logical positions, the candidate set. It is the
single place for the per-token adapter gate and the compiled forwards (`DiffusionLM.compile`: a
torch.compile'd model, and with aot=True the decode steps' exported program, edlm.aot).

`KVRows` is a KV cache shared by a batch's rows, with each key's logical position and validity
per row ([B, K]): rows of different lengths, rows that left and joins leave masked-out columns.
`KVRows.forward` feeds new tokens against it ("keys = cache ; new" is `keys_with`), keeps the KV
of the first `keep_new` of them (clean tokens) and crops the rest (a block still being
decoded, drafts), and counts the model calls.

Token shift: a shift model predicts the token at position p from position p - 1 (`lag(dlm)` is
that 1, else 0); a block's first slot then comes from the clean token before it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from edlm.drafter import gate_of
from edlm.moe import ExpertPlan, routing_of
from edlm.vision import VisionRow, VisionRows


def lag(dlm) -> int:
    """How many positions before a token the logits that predict it sit (1 with token shift)."""
    return 1 if dlm.config.shift else 0


def candidate_logits(dlm, logits: torch.Tensor) -> torch.Tensor:
    """The mask token is never a candidate, nor are padded vocabulary rows beyond the tokenizer.
    One in-place fill with the ids kept per model (vocabulary, tokenizer, mask id and device): this
    runs every step, and `len(tokenizer)` plus two indexed writes cost ~50 us of a ~3 ms step."""
    vocab, mask_id = logits.shape[-1], dlm.config.mask_token_id
    limit = len(dlm.tokenizer) if dlm.tokenizer is not None else vocab
    key = (vocab, limit, mask_id, logits.device)
    memo = dlm.__dict__.get("_not_candidates")
    if memo is None or memo[0] != key:
        ids = list(range(limit, vocab)) + ([mask_id] if mask_id is not None and mask_id < limit else [])
        memo = dlm._not_candidates = (key, torch.tensor(ids, dtype=torch.long, device=logits.device))
    if memo[1].numel():
        logits.index_fill_(-1, memo[1], float("-inf"))
    return logits


def model_forward(dlm, positions: torch.Tensor, mask, ids: torch.Tensor | None = None,
                  embeds: torch.Tensor | None = None, cache=None, logits_to_keep=0, noisy=None,
                  experts=None, vision=None) -> torch.Tensor:
    """Candidate logits (float32) of one model call: the only place decoding and scoring run the model.

    positions [B, Q] logical (-1 = padding, fed as 0 and masked out as a key); mask [B, Q, K] bool
    (True = attend; K = cached keys then the Q new ones), or already in the backend's form (4-D,
    or a flex BlockMask), as a block's later steps reuse it, or None: causal over the whole input,
    the backend's fast path (edlm.decode.step.causal_prefill); logits_to_keep as HF takes it (an int
    for the last n queries, or a [B, Q] bool for chosen ones). noisy: which queries are noisy (a
    block being decoded, a mask block), where a drafting adapter acts (edlm.drafter): a [B, Q] bool,
    or an int n for "queries n on"; None: every query is clean, the parent's. experts: an MoE
    model's edlm.moe.ExpertPlan for this forward (what its expert layers count, reuse, limit).
    vision: a VLM's edlm.vision.VisionRows of the batch's rows: the prompt's image tokens take their
    image features and M-RoPE models get their 3-D position ids (edlm.vision).
    """
    if torch.is_tensor(mask) and mask.dim() == 3:
        mask = dlm.backend_mask(mask)
    gate = gate_of(dlm.inner_model)
    if gate is not None and isinstance(noisy, int):
        noisy = (torch.arange(positions.shape[1], device=positions.device) >= noisy)[None].expand_as(positions)
    routing = routing_of(dlm.inner_model) if experts is not None else None
    position_ids = positions.clamp_min(0)
    if vision is not None:
        embeds, position_ids = vision.inputs(dlm.inner_model, positions, ids, embeds)
        ids = None
    aot = dlm.aot_step
    if (aot is not None and experts is None and vision is None
            and aot.fits(ids, embeds, mask, cache, logits_to_keep)):  # a decode step: the AOT program
        return candidate_logits(dlm, aot(ids, position_ids, mask, cache, noisy, logits_to_keep).float())
    net = dlm.model
    if dlm.compiled_model is not None:
        net = dlm.compiled_model
        contiguous_cache(cache)
    with gate.open_on(noisy) if gate is not None else nullcontext(), \
            routing.planned(experts) if routing is not None else nullcontext():
        out = net(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                  cache=cache, use_cache=cache is not None, logits_to_keep=logits_to_keep)
    return candidate_logits(dlm, out.logits.float())


def contiguous_cache(cache) -> None:
    """Give a compiled forward dense cache tensors: a cropped cache (a block's drafts dropped, rows
    selected) is a strided view, and torch.compile guards on strides, so each new stride would be
    one more graph. The copy is of a crop's tensors only, and small beside a forward."""
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if torch.is_tensor(keys) and not keys.is_contiguous():
            layer.keys = keys.contiguous()
        if torch.is_tensor(values) and not values.is_contiguous():
            layer.values = values.contiguous()


class KVRows:
    """A KV cache shared by a batch's rows, each key's logical position and validity per row."""

    calls = 0  # model calls made through `forward`
    # an MoE model's [B, 2] (activations, pairs) since its reader (the block engine) last reset it; None:
    # not counted (the decoders that report no expert counts pay nothing for them)
    experts_used: torch.Tensor | None = None
    # a VLM's images of the rows (edlm.vision.VisionRows), following rows as they leave and join;
    # None: every row is text only
    vision: VisionRows | None = None

    def init_cache(self, n: int, device, vision: list[VisionRow | None] | None = None) -> None:
        from transformers import DynamicCache

        self.vision = VisionRows(vision) if vision is not None else None
        self.cache = DynamicCache()
        self.cache_pos = torch.zeros(n, 0, dtype=torch.long, device=device)  # [B, K]
        self.cache_valid = torch.zeros(n, 0, dtype=torch.bool, device=device)  # [B, K]

    def keys_with(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity [B, K + Q] of the keys a forward of queries at q_pos sees: the
        cached ones, then the new ones (padding, position -1, is no key)."""
        return torch.cat([self.cache_pos, q_pos], 1), torch.cat([self.cache_valid, q_pos >= 0], 1)

    def forward(self, dlm, q_pos: torch.Tensor, mask, keep_new: int, ids=None, embeds=None,
                logits_to_keep=0, noisy=None, experts: ExpertPlan | None = None) -> torch.Tensor:
        """Feed new tokens (ids or embeds [B, Q(, H)] at q_pos) against the cache; their first
        `keep_new` stay cached as clean keys, the KV of the rest is cropped. Candidate logits.
        noisy: the noisy queries, as model_forward takes them; experts: an MoE model's plan (default,
        while `experts_used` counts: one that only counts)."""
        counting = self.experts_used is not None
        if experts is None and counting and routing_of(dlm.inner_model) is not None:
            experts = ExpertPlan(rows=q_pos.shape[0])
        if experts is not None:
            experts.counted = q_pos >= 0  # padding is the batch's, not a row's
        logits = model_forward(dlm, q_pos, mask, ids=ids, embeds=embeds, cache=self.cache,
                               logits_to_keep=logits_to_keep, noisy=noisy, experts=experts,
                               vision=self.vision)
        self.calls += 1
        if counting and experts is not None and experts.activations is not None:
            self.experts_used = self.experts_used + torch.stack([experts.activations, experts.pairs], 1)
        self.drop_last_keys(q_pos.shape[1] - keep_new, written=False)
        clean = q_pos[:, :keep_new]
        self.cache_pos = torch.cat([self.cache_pos, clean], 1)
        self.cache_valid = torch.cat([self.cache_valid, clean >= 0], 1)
        return logits

    def drop_last_keys(self, n: int, written: bool = True) -> None:
        """Crop the last n keys of the cache (with their positions, unless not recorded yet)."""
        if n <= 0:
            return  # DynamicCache.crop(0) would empty the cache
        self.cache.crop(-n)
        if written:
            self.cache_pos, self.cache_valid = self.cache_pos[:, :-n], self.cache_valid[:, :-n]

    def select_cache_rows(self, idx: torch.Tensor) -> None:
        if self.vision is not None:
            self.vision = self.vision.select(idx.tolist())
        if self.cache.get_seq_length() == 0:
            # nothing cached yet (every prompt shorter than a block); DynamicCache leaves empty
            # layers at their old batch size here, which the next forward cannot extend
            from transformers import DynamicCache

            self.cache = DynamicCache()
        else:
            self.cache.batch_select_indices(idx)
        self.cache_pos, self.cache_valid = self.cache_pos[idx], self.cache_valid[idx]

    def add_cache_rows(self, n_new: int, vision: list[VisionRow | None] | None = None) -> None:
        """Rows for `n_new` joining requests: copies of row 0's KV, all masked out (and their
        images, a VLM's, where they have some)."""
        n_old, dev = self.cache_pos.shape[0], self.cache_pos.device
        if n_old == 0:
            self.init_cache(n_new, dev, vision)
            return
        joined = VisionRows.joined(self.vision, n_old, vision, n_new)
        idx = torch.cat([torch.arange(n_old), torch.zeros(n_new, dtype=torch.long)]).to(dev)
        self.select_cache_rows(idx)
        self.cache_valid = self.cache_valid.clone()
        self.cache_valid[n_old:] = False
        self.cache_pos = self.cache_pos.clone()
        self.cache_pos[n_old:] = -1
        self.vision = joined

    def compact_keys(self) -> None:
        """Move each row's valid keys to the front of its cache row (in their order) and drop the
        columns that are then padding for every row. Rows of other lengths, rows that left and above
        all rows that joined a running call (each joins with the others' width of padding, and its
        own keys are padding to them) would otherwise widen the cache without bound: under a
        server's stream of joins, every row attended thousands of padding keys. Positions are
        explicit (RoPE is applied when a key is written) and the mask follows cache_pos/valid, so
        where a key sits is free: this is exact. Called when rows leave or join (one host read); it
        copies the cache only where that drops at least an eighth of its columns."""
        layers = getattr(self.cache, "layers", [])
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            return  # a sliding window keeps its own layout
        width, total = self.cache_valid.shape[1], self.cache.get_seq_length()
        if total != width or width == 0:
            return  # nothing cached yet
        keep = int(self.cache_valid.sum(1).max())
        if width - keep < max(8, width // 8):
            return  # not worth a copy of the cache: packing pays where it drops many columns
        order = torch.argsort((~self.cache_valid).to(torch.int8), dim=1, stable=True)[:, :keep]  # [B, keep]
        for layer in layers:
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        self.cache_pos, self.cache_valid = self.cache_pos.gather(1, order), self.cache_valid.gather(1, order)
