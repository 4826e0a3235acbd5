"""Training for parallelism: loss terms that teach a dLM to commit more tokens per forward.

A dLM trained only with the paper's loss is unsure of late block positions until the early ones
are committed, so its decoding steps commit few tokens. The methods here (each a TrainConfig
option, alone or together, applied by `objective.diffusion_loss`) sharpen it, following the
recipes as their code states them (../shared/method.md, "Training for parallelism"):
- on-policy substitution (DMax OPUT): masked tokens replaced by the model's own argmax of one
  no-grad forward, still scored against the clean tokens, so the model learns to keep right
  drafts and fix wrong ones. The older `repair_fraction` is its per-position form (a fraction of
  the masked tokens of every example); OPUT's is per example (all masked tokens of a fraction of
  the examples, at a fixed mask ratio). One function chooses both.
- certainty forcing (dParallel): the entropy of the sharpened distribution, on the masked tokens
  whose argmax is already right, is minimised: right answers become confident enough to commit.
- draft-position weights (DFlash): cross-entropy at block position j weighted exp(-j / gamma),
  since drafting pays only for the leading run of right tokens.
- distillation from a smaller-block teacher (BARD): top-k forward KL to a frozen dLM that sees
  the same noisy input with smaller blocks (so more clean context).
- training windows (D2F's noisy-sees-noisy blocks, for multi-block decoding): blocks are grouped
  into windows of N, and each block sees the noisy blocks of its window before it, as the later
  blocks of a decoding window see the undecided ones before them (`window_starts`).
- schedules (d3LLM's noise floor, BARD's progressive block merging) are functions of the step,
  so a resumed run continues on the same ones: edlm.train.settings.TrainSettings.at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_starts(active: torch.Tensor, window: int, generators) -> torch.Tensor:
    """[B, n_blocks] the first block of each block's training window (itself: the plain layout).

    Windows are `window` blocks long from a per-example offset drawn from its generator, so every
    block is trained both first in its window (seeing clean blocks before it, as a decoding
    window's leading block does) and later in one (seeing the noisy ones before it). A window
    never reaches back past a block without loss (active False, not fed: prompt-only blocks,
    unmasked ones), so every block a noisy token sees is in the input. Complementary halves
    (B = 2 x generators) share their source example's windows."""
    batch, n_blocks = active.shape
    b = torch.arange(n_blocks, device=active.device)[None]
    if window <= 1:
        return b.expand(batch, -1).clone()
    offset = torch.stack([torch.randint(window, (), generator=g) for g in generators]).to(active.device)
    if len(generators) != batch:
        offset = torch.cat([offset, offset])
    start = ((b - offset[:, None]).div(window, rounding_mode="floor") * window + offset[:, None]).clamp_min(0)
    last_inactive = torch.where(active, -1, b).cummax(1).values  # the latest block without loss, at or before b
    return torch.where(active, torch.maximum(start, last_inactive + 1), b)


def chosen_for_drafts(masked: torch.Tensor, generators, rows_fraction: float,
                      positions_fraction: float) -> torch.Tensor:
    """[B, L] the masked positions to fill with the model's own drafts: every masked position of
    the examples drawn with probability `rows_fraction` (OPUT), and a `positions_fraction` of the
    masked positions of the others (the repair fraction). Drawn from each example's generator, so
    a complementary view (rows B/2..B) reuses its source example's draws, inverted."""
    n = len(generators)
    u_pos = torch.stack([torch.rand(masked.shape[1], generator=g) for g in generators])
    u_row = torch.stack([torch.rand((), generator=g) for g in generators])
    if n != masked.shape[0]:  # complementary halves
        u_pos, u_row = torch.cat([u_pos, 1 - u_pos]), torch.cat([u_row, u_row])
    u_pos, u_row = u_pos.to(masked.device), u_row.to(masked.device)
    return masked & ((u_row[:, None] < rows_fraction) | (u_pos < positions_fraction))


@torch.no_grad()
def substitute_drafts(dlm, x_t, x_0, chosen, attention: str, active=None, block_size=None,
                      vision=None) -> torch.Tensor:
    """x_t with the `chosen` positions replaced by the argmax of one no-grad forward on x_t (eval mode,
    as DMax's: no dropout in the drafts)."""
    was_training = dlm.model.training
    dlm.model.eval()
    try:
        draft = dlm.forward_noisy(x_t, x_0, attention=attention, active=active, block_size=block_size,
                                  vision=vision).argmax(-1)
    finally:
        dlm.model.train(was_training)
    return torch.where(chosen, draft, x_t)


def certainty_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """dParallel's certainty forcing: mean entropy of softmax(logits / temperature) over the rows of
    `logits` [N, V] whose argmax equals `labels` [N]; 0 when none is right (wrong tokens are left to
    the cross-entropy: making them confident would make them commit)."""
    right = (logits.argmax(-1) == labels).float()  # weights, not a selection: no host sync in the step
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * right).sum() / right.sum().clamp_min(1.0)


def draft_position_weights(seq_len: int, block_size: int, gamma: float, device=None) -> torch.Tensor:
    """[L] exp(-j / gamma) for block position j (DFlash's exp(-(k-1)/gamma), k counted from 1),
    scaled to mean 1 over a block so the loss keeps its size."""
    j = torch.arange(block_size, dtype=torch.float32, device=device)
    w = torch.exp(-j / gamma)
    w = w / w.mean()
    return w.repeat(-(-seq_len // block_size))[:seq_len]


def top_k_kl(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) restricted to the teacher's top-k tokens, both
    renormalised over those k (BARD's top-16 forward KL): zero exactly when the two agree there."""
    top, idx = teacher.float().topk(min(k, teacher.shape[-1]), dim=-1)
    log_t = F.log_softmax(top, dim=-1)
    log_s = F.log_softmax(student.float().gather(-1, idx), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def parse_block_schedule(entries: list[str] | None) -> tuple[tuple[int, int], ...]:
    """`SIZE@STEP` strings -> ((step, size), ...) sorted by step; ValueError names a bad entry."""
    stages = []
    for entry in entries or []:
        size, at, step = entry.partition("@")
        try:
            stage = (int(step), int(size))
        except ValueError:
            raise ValueError(f"{entry!r} is not SIZE@STEP (e.g. 16@500)") from None
        if not at or stage[0] < 0 or stage[1] < 1:
            raise ValueError(f"{entry!r} is not SIZE@STEP with SIZE >= 1 and STEP >= 0")
        stages.append(stage)
    if len({s for s, _ in stages}) != len(stages):
        raise ValueError("two block sizes start at the same step")
    return tuple(sorted(stages))
