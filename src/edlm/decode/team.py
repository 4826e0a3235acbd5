"""TEAM (arXiv 2602.08404, PKU-SEC-Lab/TEAM-MoE-dLLM) for MoE dLMs: fewer expert activations per
committed token, as options of the plain commit rules (`team`: cache, cold, explore, any two joined
by "+", or all).

An MoE dLM's time goes to its experts, and their routing hardly changes between the denoising
steps of a block. Each step here remembers, per row, what the next step of the same block needs
(`TeamMemo`): the ids it fed, every layer's MoE output for the block, and its predictions with their
confidences. Then (edlm.moe.ExpertPlan carries the first two into the expert layers):
- cache (delayed caching): a slot fed the same decided token as in the last step reuses that step's
  MoE output (router and experts skipped; attention is recomputed). A slot decided in the last step
  is computed once more with its token, then cached.
- cold (limited activation): a masked slot more than COLD_DISTANCE slots from every decided one, not
  among the WARM_TOP most confident, and below COLD_CONFIDENCE last step may only use experts its
  row's other computed tokens chose in the same forward.
- explore (speculative exploration): the block is fed in four versions in one forward: as it is, with
  the most confident masked slot filled with last step's prediction, with the second, with both.
  The commit rule runs on every version; a version is taken when the plain version commits its
  filled slot(s) to the same token (TEAM's acceptance), and then its own commits apply too: up to
  one step saved per forward. Rows move on to their next block together (a speculative strategy).

What may change and what may not: only the logits of a block's slots at its later steps (so which
tokens a block commits) differ from plain decoding. Pending clean tokens (the prompt, a finished
block) are never reused nor limited, so the KV cache of finished blocks is exactly the model's for
the text decoded, and each row's tokens are independent of its batch mates (the cold experts are
chosen per row; TEAM's batch-1 code takes the whole forward's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edlm.moe import ExpertPlan

MECHANISMS = ("cache", "cold", "explore")
SETTINGS = ("off", "cache", "cold", "explore", "cache+cold", "cache+explore", "cold+explore", "all")
COLD_DISTANCE, COLD_CONFIDENCE, WARM_TOP = 3, 0.7, 2  # TEAM's


def mechanisms(setting: str) -> frozenset[str]:
    """The mechanisms a `team` setting turns on ("all": the three)."""
    if setting == "all":
        return frozenset(MECHANISMS)
    return frozenset() if setting == "off" else frozenset(setting.split("+"))


@dataclass
class TeamMemo:
    """What a step leaves the next step of the same block, per row (rows: request ids, cpu)."""

    rows: torch.Tensor
    block_start: torch.Tensor  # [B]
    ids: torch.Tensor  # [B, bs] the ids fed
    conf: torch.Tensor  # [B, bs] confidence of each slot's prediction
    tokens: torch.Tensor  # [B, bs] each slot's prediction
    outputs: tuple[torch.Tensor, ...] | None = None  # per MoE layer [B, bs, H] (cache only)
    valid: torch.Tensor | None = None  # [B] set by `recall`: the row's memo is of its current block


def remember(batch, ids, conf, tokens, plan: ExpertPlan | None, version: torch.Tensor | None = None) -> None:
    """Keep this step's memo; `version` [B]: which of the forward's block copies each row took."""
    outputs = None
    if plan is not None and plan.record and plan.outputs:
        outputs = tuple(plan.outputs[i] for i in sorted(plan.outputs))
        if version is not None:
            n, bs = ids.shape
            take = torch.arange(n, device=ids.device)
            outputs = tuple(o.view(n, -1, bs, o.shape[-1])[take, version] for o in outputs)
    batch.team_memo = TeamMemo(batch.rows.clone(), batch.block_start.clone(), ids, conf, tokens, outputs)


def recall(batch) -> TeamMemo | None:
    """The memo aligned to the batch's rows now, `valid` where it is of the row's current block."""
    memo = getattr(batch, "team_memo", None)
    if memo is None:
        return None
    where = {int(r): i for i, r in enumerate(memo.rows)}
    idx = torch.tensor([where.get(int(r), -1) for r in batch.rows])
    dev = batch.block_start.device
    take = idx.clamp_min(0).to(dev)
    valid = (idx >= 0).to(dev) & (memo.block_start[take] == batch.block_start)
    outputs = tuple(o[take] for o in memo.outputs) if memo.outputs is not None else None
    return TeamMemo(batch.rows, batch.block_start, memo.ids[take], memo.conf[take], memo.tokens[take], outputs, valid)


def cold_slots(todo: torch.Tensor, decided: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """[B, bs] TEAM's cold tokens: masked, more than COLD_DISTANCE slots from every decided slot (none
    where nothing is decided), not among the WARM_TOP most confident masked ones, and below
    COLD_CONFIDENCE; conf: last step's confidences."""
    bs = todo.shape[1]
    slot = torch.arange(bs, device=todo.device)
    gap = (slot[:, None] - slot[None, :]).abs()  # [bs, bs]
    dist = torch.where(decided[:, None, :], gap[None], bs).amin(-1)
    far = (dist > COLD_DISTANCE) & decided.any(-1, keepdim=True)
    score = conf.masked_fill(~todo, -1.0)
    rank = score.argsort(-1, descending=True).argsort(-1)
    return todo & far & (rank >= WARM_TOP) & (conf < COLD_CONFIDENCE)


def plan_for(dlm, batch, team: frozenset[str], memo: TeamMemo | None, ids: torch.Tensor, todo: torch.Tensor,
             decided: torch.Tensor) -> ExpertPlan:
    """The expert plan of a forward of block versions ids [B, C, bs] (todo: their masked slots;
    decided [B, bs]: the slots cold distances are measured from)."""
    n, copies, bs = ids.shape
    mask_id = dlm.config.mask_token_id
    plan = ExpertPlan(rows=n, tail=copies * bs, record="cache" in team,
                      slots=torch.arange(bs, device=ids.device).repeat(copies))
    if memo is None or not bool(memo.valid.any()):
        return plan
    valid = memo.valid[:, None, None]
    if "cache" in team and memo.outputs is not None:
        plan.reuse = (valid & (ids == memo.ids[:, None]) & (memo.ids != mask_id)[:, None]).view(n, -1)
        plan.memo = memo.outputs
    if "cold" in team:
        cold = cold_slots(batch.todo, decided, memo.conf)[:, None] & todo
        plan.cold = (valid & cold).view(n, -1)
    return plan


def explore_step(dlm, batch, team: frozenset[str], memo: TeamMemo | None, pick, commit_rows):
    """One forward of four block versions (module docstring); None where it does not apply (a
    block's first step, a row without a memo): the caller takes a plain step.

    memo: `recall(batch)`; pick(logits) -> (tokens, conf, entropy); commit_rows(conf, entropy, todo)
    -> commit mask, the strategy's rule on [N, bs]. Returns the tokens each row committed [B]."""
    from edlm.decode.step import apply_commit, forward_block, record_logprobs, slot_logprobs

    if memo is None or batch.pending_ids.shape[1] or not bool(memo.valid.all()):
        return None
    n, bs = batch.block_ids.shape
    todo, dev = batch.todo, batch.block_ids.device
    score = memo.conf.masked_fill(~todo, float("-inf"))
    top = score.topk(min(2, bs), dim=-1).indices
    left = todo.sum(-1, keepdim=True)
    first = F.one_hot(top[:, 0], bs).bool() & (left >= 1)
    second = F.one_hot(top[:, -1], bs).bool() & (left >= 2) if bs > 1 else torch.zeros_like(first)
    fills = torch.stack([torch.zeros_like(first), first, second, first | second], 1)  # [B, 4, bs]
    ids = torch.where(fills, memo.tokens[:, None], batch.block_ids[:, None])
    todo4 = todo[:, None] & ~fills
    plan = plan_for(dlm, batch, team, memo, ids, todo4, ids[:, 3] != dlm.config.mask_token_id)
    logits = forward_block(dlm, batch, ids=ids.view(n, -1), copies=4, experts=plan)  # [B, 4, bs, V]
    tokens, conf, entropy = pick(logits)
    flat = lambda x: x.reshape(n * 4, bs) if x is not None else None  # noqa: E731
    commits = commit_rows(flat(conf), flat(entropy), flat(todo4)).view(n, 4, bs)

    def agrees(version, slot):  # the version commits the filled slot to the filled token
        return (commits[:, version] & (tokens[:, version] == memo.tokens) & slot).any(-1)

    a1, a2, a12, a21 = agrees(0, first), agrees(0, second), agrees(1, second), agrees(2, first)
    version = torch.where((a1 & a2) | (a1 & a12) | (a2 & a21), 3, torch.where(a1, 1, torch.where(a2, 2, 0)))
    rows = torch.arange(n, device=dev)
    fill, chosen, new = fills[rows, version], commits[rows, version], tokens[rows, version]
    apply_commit(dlm, batch, fill, memo.tokens)
    record_logprobs(batch, fill, slot_logprobs(batch, logits[:, 0], memo.tokens))  # v0 agreed with the fills
    chosen = chosen & batch.todo  # nothing after an EOS a fill set
    apply_commit(dlm, batch, chosen, new)
    record_logprobs(batch, chosen, slot_logprobs(batch, logits[rows, version], new))
    remember(batch, ids[rows, version], conf[rows, version], new, plan, version)
    return fill.sum(-1) + chosen.sum(-1)
