"""The forward (noising) process: which tokens of each block get replaced by the mask token.

Position-dependent masking (paper Eq. 2): inside a block, position i gets weight
w_i(t) = exp(beta * (1 - t) * i) with beta = ln 2 / (half_life * L'). Exactly round(t * L')
positions per block are drawn without replacement proportionally to w (Gumbel-top-k). At small
t later positions are masked far more often, mirroring the roughly left-to-right order in which
decoding unmasks a block; as t -> 1 the weights flatten to uniform.

Trajectory masking (d3LLM's pseudo-trajectory distillation): where the data records when the
decoder committed each token (u = (step + 1) / steps of its decode block, `edlm distill-data
--trajectory`), a token is masked iff u > 1 - t, so every decode block is in a state its decoder
really passed through, the input the model meets when decoding; tokens with no recorded time fall
back to position masking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

MASKINGS = ("position", "uniform", "reverse", "full", "trajectory")


@dataclass(frozen=True)
class NoiseSettings:
    """Which tokens a training example gets masked: the noise, and nothing else."""

    # position: Eq. 2 (the paper's); uniform; reverse: Eq. 2 mirrored (earlier positions masked
    # more, the paper's right-to-left study); full: every maskable token of every block (t = 1),
    # TiDAR's drafting blocks, a dense loss on predicting whole blocks from the clean earlier context;
    # trajectory: the decoder's recorded states (d3LLM), position masking where no time is recorded.
    masking: str = "position"
    half_life: float = 0.1  # lambda of position/reverse masking (and trajectory's fallback)
    t_per_block: bool = False  # the paper draws one t per sequence
    t_min: float = 1e-3
    complementary: bool = False  # also each sample with the inverse mask
    # a fixed noise level in place of t ~ U[t_min, 1] (DMax OPUT masks at 0.75); None = drawn
    mask_ratio: float | None = None
    # d3LLM's noise curriculum: t_min rises linearly to this over the run (TrainSettings.at); 0 = off
    noise_floor: float = 0.0
    # a mixture with full masking: this fraction of the drawn noise levels (rows, or blocks with
    # t_per_block) is t = 1, every maskable token masked; the rest keep their masking. One model then
    # learns both the wholly masked blocks `verified` drafts and the partly decided ones the threshold
    # rules meet; 0 = off (and no extra draw, so existing runs replay identically)
    full_fraction: float = 0.0

    def at_progress(self, progress: float) -> "NoiseSettings":
        """The noise at `progress` in [0, 1] of the run: the floor curriculum raises t_min."""
        if self.noise_floor <= self.t_min:
            return self
        floor = self.t_min + (self.noise_floor - self.t_min) * min(max(progress, 0.0), 1.0)
        return replace(self, t_min=floor)

    @property
    def signed_half_life(self) -> float | None:
        """sample_block_mask's half_life: None = uniform, negative = mirrored."""
        return {"position": self.half_life, "reverse": -self.half_life, "trajectory": self.half_life}.get(self.masking)


def position_weights(t: torch.Tensor | float, block_size: int, half_life: float) -> torch.Tensor:
    """w_i(t) for i in [0, block_size); shape t.shape + [block_size]."""
    t = torch.as_tensor(t, dtype=torch.float32)
    beta = math.log(2.0) / (half_life * block_size)
    i = torch.arange(block_size, dtype=torch.float32, device=t.device)
    return torch.exp(beta * (1.0 - t)[..., None] * i)


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).long()


def sample_block_mask(
    t: torch.Tensor,
    seq_len: int,
    block_size: int,
    half_life: float | None = 0.1,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [B, seq_len], True = replace by the mask token.

    t: [B] (one noise level per sequence, the paper) or [B, n_blocks] (one per block).
    Each block masks exactly round(t * m) of its m maskable positions (m = L' for a full block
    with no prompt/padding). maskable [B, seq_len] (default all True) marks positions that may be
    masked; prompt and padding never are. half_life=None gives uniform masking; a negative
    half_life mirrors the weights (earlier positions masked more: the paper's right-to-left study).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    t = torch.as_tensor(t, dtype=torch.float32)
    batch = t.shape[0]
    n_blocks = -(-seq_len // block_size)
    padded = n_blocks * block_size
    device = t.device
    if t.dim() == 1:
        t = t[:, None].expand(batch, n_blocks)
    if t.shape != (batch, n_blocks):
        raise ValueError(f"t must be [B] or [B, {n_blocks}], got {tuple(t.shape)}")

    allowed = torch.zeros(batch, padded, dtype=torch.bool, device=device)
    allowed[:, :seq_len] = True if maskable is None else maskable.to(device).bool()
    allowed = allowed.view(batch, n_blocks, block_size)

    if half_life is None:
        log_w = torch.zeros(batch, n_blocks, block_size, device=device)
    else:
        log_w = position_weights(t, block_size, half_life).log()
    uniform = torch.rand(batch, n_blocks, block_size, generator=generator, device=device)
    gumbel = -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))
    scores = torch.where(allowed, log_w + gumbel, torch.full_like(log_w, -math.inf))

    # rank of each position inside its block by descending score; the top k are masked
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    k = _round_half_up(t * allowed.sum(-1))  # [B, n_blocks]
    masked = (rank < k[..., None]) & allowed
    return masked.view(batch, padded)[:, :seq_len]


def sample_noise_level(
    batch: int,
    n_blocks: int | None = None,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """t ~ U[t_min, 1]: shape [B] (per sequence) or [B, n_blocks] (per block)."""
    shape = (batch,) if n_blocks is None else (batch, n_blocks)
    u = torch.rand(shape, generator=generator, device=device)
    return t_min + (1.0 - t_min) * u


def trajectory_mask(t: torch.Tensor, order: torch.Tensor, maskable: torch.Tensor, block_size: int,
                    half_life: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, L]: maskable tokens committed at time u > s = 1 - t (t: [B] or [B, n_blocks]).

    u = (step + 1) / steps of its decode block, so {u > s} is every decode block "before step
    floor(s * steps)" (step >= k iff u > k / steps): a state the decoder really passed through, each of
    a block's states about equally often as s runs over [0, 1), its first (all masked) included. With
    t per block this holds for every decode block that lies inside one training block (packing need
    not align the two). Tokens with no time (order < 0:
    a response whose trajectory did not survive re-tokenisation, an EOS the decoder never generated)
    take position masking of the same t among themselves; with none known this is exactly
    `sample_block_mask` (the same generator draws).
    """
    seq_len = order.shape[1]
    t = torch.as_tensor(t, dtype=torch.float32)
    known = maskable.bool() & (order >= 0)
    fallback = sample_block_mask(t, seq_len, block_size, half_life, generator, maskable.bool() & ~known)
    t_at = t[:, None] if t.dim() == 1 else t.repeat_interleave(block_size, dim=1)[:, :seq_len]  # [B, 1 | L]
    return fallback | (known & (order > 1.0 - t_at))


def sample_masks(input_ids, maskable, block_size: int, noise: NoiseSettings, generators,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] bool masked positions, each row drawn from its own generator. order: [B, L] float,
    each token's decode time (trajectory masking; -1 = unknown), or None (every token unknown)."""
    if noise.masking == "full":
        return maskable.bool().clone()
    seq_len = input_ids.shape[1]
    n_blocks = -(-seq_len // block_size)
    out = []
    for i, gen in enumerate(generators):
        t = sample_noise_level(1, n_blocks if noise.t_per_block else None, noise.t_min, gen)
        if noise.mask_ratio is not None:
            t = torch.full_like(t, noise.mask_ratio)  # drawn all the same: the generator stays in step
        if noise.full_fraction > 0:
            t = torch.where(torch.rand(t.shape, generator=gen) < noise.full_fraction, torch.ones_like(t), t)
        row = maskable[i : i + 1].cpu()
        if noise.masking == "trajectory" and order is not None:
            out.append(trajectory_mask(t, order[i : i + 1].cpu(), row, block_size, noise.half_life, gen))
        else:
            out.append(sample_block_mask(t, seq_len, block_size, noise.signed_half_life, gen, row))
    return torch.cat(out).to(input_ids.device)
