"""Training objectives: the paper's 1/t-weighted masked cross-entropy, and plain causal LM.

The terms that train for parallelism (on-policy drafts, certainty forcing, draft-position weights,
a smaller-block teacher) are options of the diffusion loss; their why: edlm.train.parallelism.

Both take a packed batch (input_ids [B, L], maskable [B, L]: False on prompt/padding tokens,
which are never masked and never scored) and return (loss, number of scored tokens). A VLM batch
with images also passes its edlm.vision.VisionRows (`vision`): the forwards then feed input
embeddings with the image features and, on M-RoPE models, 3-D position ids (edlm.vision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edlm.moe import router_balance_loss, router_logits
from edlm.train.noise import NoiseSettings, sample_masks
from edlm.train.parallelism import (
    certainty_loss,
    chosen_for_drafts,
    draft_position_weights,
    substitute_drafts,
    top_k_kl,
    window_starts,
)


@dataclass(frozen=True)
class LossSettings:
    """How the diffusion loss is computed from a noised batch (the noise itself: NoiseSettings)."""

    attention: str = "clean"  # the training layout (edlm.model.ATTENTION_VARIANTS)
    # weight `a` of the AR next-token loss on the clean stream (needs config.causal_clean, which
    # edlm.train.settings.reconcile turns on): L = a * L_AR(clean) + L_diffusion(noisy), from the
    # same forward (MARS/TiDAR: keeping an AR loss keeps the parent's accuracy, and trains the
    # verifier the `verified` strategy uses).
    ar_loss_weight: float = 0.0
    # DMax-style on-policy repair: this fraction of the masked positions is filled with the
    # model's own argmax draft (one extra no-grad forward) and still scored, so the model learns
    # to keep right drafts and fix wrong ones, the input the soft/re-masking decoders create.
    repair_fraction: float = 0.0
    # DMax OPUT: this fraction of the examples gets *every* masked token filled with its draft (the
    # same extra forward as the repair fraction, which is its per-position form)
    on_policy: float = 0.0
    # dParallel certainty forcing: weight of the entropy (at this temperature) of the masked tokens
    # the model already predicts right
    certainty_weight: float = 0.0
    certainty_temperature: float = 0.5
    draft_decay: float = 0.0  # DFlash gamma: CE at block position j weighted exp(-j / gamma); 0 = off
    # D2F-style training windows for multi-block decoding: blocks in windows of this many, each seeing the
    # noisy blocks of its window before it (edlm.train.parallelism.window_starts); 1 = the paper's layout
    window: int = 1
    # BARD: weight and k of the top-k forward KL to a teacher dLM (passed to diffusion_loss)
    teacher_weight: float = 0.0
    teacher_top_k: int = 16
    # MoE models: weight of the router's load-balancing loss (edlm.moe.router_balance_loss); the loop
    # sets it from --router-aux-loss or the base config (edlm.train.loop.load_for_training)
    router_aux_weight: float = 0.0
    # Feed only the noisy blocks that hold a masked token (exact: a noisy token attends only its
    # own noisy block). False feeds every block, the plain concat layout (benchmarks, tests).
    skip_unmasked_blocks: bool = True


def row_generators(seed: int, step: int, rows: torch.Tensor) -> list[torch.Generator]:
    """One generator per global example index: the noise an example gets depends only on
    (seed, step, its index in the global batch), so runs with any process count and any resume
    point draw identical masks."""
    return [torch.Generator().manual_seed(hash((seed, step, int(r))) & 0x7FFF_FFFF) for r in rows]


def inverse_time_weights(masked: torch.Tensor, maskable: torch.Tensor, block_size: int) -> torch.Tensor:
    """1/t per position, with t the block's realised mask ratio k/m (= round(t L')/L').

    Using the realised ratio rather than the drawn t keeps the weight finite and exact when
    rounding masks zero or few tokens (literal 1/t at t=1e-3 spiked the loss in a trial on the tiny model).
    """
    batch, seq_len = masked.shape
    n_blocks = -(-seq_len // block_size)
    pad = n_blocks * block_size - seq_len
    k = F.pad(masked.float(), (0, pad)).view(batch, n_blocks, block_size).sum(-1)
    m = F.pad(maskable.float(), (0, pad)).view(batch, n_blocks, block_size).sum(-1)
    w = m / k.clamp_min(1.0)
    return w.repeat_interleave(block_size, dim=1)[:, :seq_len]


def diffusion_loss(dlm, input_ids, maskable, noise: NoiseSettings, generators, loss: LossSettings = LossSettings(),
                   teacher=None, block_size: int | None = None, vision=None, teacher_vision=None, order=None):
    """Eq. 1: E_t E_x_t [ (1/t) * sum_masked -log p(x_0[i] | x_t, clean earlier blocks) ],
    normalised by the number of maskable tokens; plus `loss.ar_loss_weight` times the clean stream's
    next-token loss (causal-clean models), normalised as `causal_lm_loss` is, and the parallelism
    terms `loss` turns on. `teacher`: a frozen dLM for `loss.teacher_weight`; `block_size`: this
    step's (a block schedule's), default the model's; `vision` / `teacher_vision`: the batch's images
    as the student's / the teacher's towers see them (edlm.vision.training_vision), or None; `order`:
    [B, L] each token's decode time for trajectory masking (the batch's `order` column), or None."""
    block_size = block_size or dlm.config.block_size
    maskable = maskable.bool()
    clean_ids, clean_maskable = input_ids, maskable
    if dlm.config.shift:
        maskable = maskable.clone()
        maskable[:, 0] = False  # nothing predicts position 0 under shift
    masked = sample_masks(input_ids, maskable, block_size, noise, generators, order)
    if noise.complementary:
        # the inverse mask trains every maskable token in every sample exactly once
        masked = torch.cat([masked, maskable & ~masked])
        input_ids = torch.cat([input_ids, input_ids])
        maskable = torch.cat([maskable, maskable])
        vision, teacher_vision = (_twice(v) for v in (vision, teacher_vision))
    x_t = torch.where(masked, torch.full_like(input_ids, dlm.config.mask_token_id), input_ids)
    active = blocks_with_loss(masked, block_size) if loss.skip_unmasked_blocks else None
    if loss.repair_fraction > 0 or loss.on_policy > 0:
        chosen = chosen_for_drafts(masked, generators, loss.on_policy, loss.repair_fraction)
        x_t = substitute_drafts(dlm, x_t, input_ids, chosen, loss.attention, active, block_size, vision)
    with_ar = loss.ar_loss_weight > 0
    windows = None
    if loss.window > 1:
        windows = window_starts(active if active is not None else blocks_with_loss(torch.ones_like(masked), block_size),
                                loss.window, generators)
    with router_logits(dlm.inner_model, loss.router_aux_weight > 0) as routed:
        logits = dlm.forward_noisy(x_t, input_ids, attention=loss.attention, active=active, with_clean=with_ar,
                                   block_size=block_size, vision=vision, window_start=windows)
    if with_ar:
        logits, clean = logits
    weights = inverse_time_weights(masked, maskable, block_size)
    if loss.draft_decay > 0:
        weights = weights * draft_position_weights(masked.shape[1], block_size, loss.draft_decay, masked.device)
    scored, labels = logits[masked], input_ids[masked]
    ce = F.cross_entropy(scored.float(), labels, reduction="none")
    n_tokens = maskable.sum().clamp_min(1)
    total = (ce * weights[masked]).sum() / n_tokens
    if with_ar:
        n = clean_ids.shape[0]  # complementary halves share one clean stream: score it once
        total = total + loss.ar_loss_weight * next_token_loss(clean[:n], clean_ids, clean_maskable)
    if routed:
        total = total + loss.router_aux_weight * router_balance_loss(routed, dlm.inner_model)
    if loss.certainty_weight > 0:
        total = total + loss.certainty_weight * certainty_loss(scored, labels, loss.certainty_temperature)
    if teacher is not None and loss.teacher_weight > 0:
        taught = teacher_logits(teacher, x_t, input_ids, masked, loss, teacher_vision)
        total = total + loss.teacher_weight * top_k_kl(scored, taught, loss.teacher_top_k)
    return total, int(masked.sum())


def _twice(vision):
    """The VisionRows of a batch stacked on itself (the complementary pair's rows)."""
    from edlm.vision import VisionRows

    return None if vision is None else VisionRows(vision.rows + vision.rows)


@torch.no_grad()
def teacher_logits(teacher, x_t, x_0, masked, loss: LossSettings, vision=None) -> torch.Tensor:
    """[N, V] the teacher's logits at the masked positions, from the student's noisy input read
    with the teacher's own (smaller) blocks: more clean context, the easier task BARD distils."""
    active = blocks_with_loss(masked, teacher.config.block_size) if loss.skip_unmasked_blocks else None
    return teacher.forward_noisy(x_t, x_0, attention=loss.attention, active=active, vision=vision)[masked]


def next_token_loss(logits, input_ids, maskable):
    """Mean cross-entropy of logit i against token i+1 over the maskable targets (HF's causal LM loss)."""
    target = input_ids[:, 1:]
    scored = maskable[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][scored].float(), target[scored])


def blocks_with_loss(masked: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, n_blocks] True where a block has a masked token: only those need a noisy copy."""
    batch, seq_len = masked.shape
    n_blocks = -(-seq_len // block_size)
    return F.pad(masked, (0, n_blocks * block_size - seq_len)).view(batch, n_blocks, block_size).any(-1)


def causal_lm_loss(model, input_ids, maskable, router_aux_weight: float = 0.0, vision=None):
    """Next-token cross-entropy (the AR baseline and the demo's AR parent), plus an MoE model's
    router balance loss at `router_aux_weight`. `vision`: a VLM batch's images (the features
    carry the vision tower's gradient when it trains: edlm.vision.training_vision(grad=True))."""
    labels = torch.where(maskable.bool(), input_ids, torch.full_like(input_ids, -100))
    inputs = {"input_ids": input_ids}
    if vision is not None:
        from edlm.vision import hf_model

        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        embeds, position_ids = vision.inputs(hf_model(model), pos, input_ids)
        inputs = {"inputs_embeds": embeds, "position_ids": position_ids}
    with router_logits(model, router_aux_weight > 0) as routed:
        out = model(**inputs, labels=labels, use_cache=False)
    loss = out.loss
    if routed:
        loss = loss + router_aux_weight * router_balance_loss(routed, model)
    return loss, int((labels[:, 1:] != -100).sum())
