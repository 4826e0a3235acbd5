"""The commit rules of edlm.decode.rules against truth tables worked out by hand.

Every expected mask below was derived from the rule's definition (rules.py docstrings and the
method notes), not from running the code. Values are binary fractions (0.5, 0.25, 0.125, ...)
wherever a case sits exactly on a rule's boundary, so float32 arithmetic is exact there and the
case tests the inequality (strict or not) rather than rounding.
"""

import math

import pytest
import torch

from edlm.decode.rules import (
    accepted_drafts,
    at_least_one,
    commit_entropy,
    commit_factor,
    commit_prefix,
    commit_steps,
    commit_threshold,
    pick_tokens,
)


def f32(rows):
    return torch.tensor(rows, dtype=torch.float32)  # [B, S], the dtype pick_tokens returns


def bits(rows):
    return torch.tensor(rows, dtype=torch.bool)  # [B, S]


def as_bits(mask: torch.Tensor) -> list[list[int]]:
    assert mask.dtype == torch.bool and mask.ndim == 2
    return mask.long().tolist()


ALL = [1, 1, 1, 1]
NONE = [0, 0, 0, 0]


# --- threshold: every candidate with confidence >= threshold, and always the top-1 -------------

def test_threshold_table():
    conf = f32([[0.9, 0.5, 0.49, 0.7],    # >= 0.5 commits, the slot exactly at 0.5 included
                [0.3, 0.2, 0.4, 0.1],     # nothing passes: the top-1 alone (slot 2)
                [0.99, 0.2, 0.6, 0.95],   # slots 0 and 3 pass but are decided: only slot 2
                [0.99, 0.2, 0.3, 0.1],    # top-1 among candidates (slot 2), not the decided slot 0
                [0.9, 0.9, 0.9, 0.9],     # no candidate: nothing, even with every slot confident
                [0.5, 0.5, 0.5, 0.5]])    # all exactly at the threshold: all
    cand = bits([ALL, ALL, [0, 1, 1, 0], [0, 1, 1, 1], NONE, ALL])
    assert as_bits(commit_threshold(conf, cand, 0.5)) == [
        [1, 1, 0, 1],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
        NONE,
        ALL,
    ]


def test_threshold_one_commits_only_certain_slots_or_the_top_1():
    conf = f32([[1.0, 0.999, 0.25, 1.0], [0.25, 0.875, 0.5, 0.75]])
    cand = bits([ALL, ALL])
    assert as_bits(commit_threshold(conf, cand, 1.0)) == [[1, 0, 0, 1], [0, 1, 0, 0]]


def test_threshold_tie_for_top_1_commits_exactly_one_of_the_tied():
    conf = f32([[0.25, 0.375, 0.375, 0.125]])  # nothing passes 0.9; slots 1 and 2 tie for best
    got = commit_threshold(conf, bits([ALL]), 0.9)[0]
    assert int(got.sum()) == 1 and bool(got[1] or got[2])


# --- prefix: leftmost candidate always, then each next slot while every candidate up to it passes

def test_prefix_table():
    conf = f32([[0.9, 0.6, 0.4, 0.9],     # run stops at slot 2; slot 3 passes but comes after a failure
                [0.1, 0.9, 0.9, 0.9],     # the leftmost candidate goes even below the threshold
                [0.9, 0.0, 0.9, 0.1],     # decided slot 1 neither breaks the run nor is committed
                [0.9, 0.9, 0.1, 0.9],     # leftmost candidate slot 2 goes though below, then slot 3 passes
                [0.5, 0.5, 0.5, 0.25],    # exactly at the threshold passes (>=); 0.25 stops the run
                [0.9, 0.9, 0.9, 0.9]])    # no candidate: nothing
    cand = bits([ALL, ALL, [1, 0, 1, 1], [0, 0, 1, 1], ALL, NONE])
    assert as_bits(commit_prefix(conf, cand, 0.5)) == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [1, 1, 1, 0],
        NONE,
    ]


def test_prefix_threshold_one_is_strict_left_to_right():
    conf = f32([[0.25, 0.99, 0.99, 0.99], [0.99, 0.99, 0.25, 0.99]])
    cand = bits([ALL, [0, 0, 1, 1]])
    assert as_bits(commit_prefix(conf, cand, 1.0)) == [[1, 0, 0, 0], [0, 0, 1, 0]]


# --- factor: top n for the largest n with (n + 1)(1 - c_n) < f, c sorted descending, n >= 1 -----

def test_factor_table():
    # f = 1.0, worked per row with c the candidates' confidences sorted descending:
    conf = f32([
        [0.7, 0.9, 0.6, 0.8],    # c = .9 .8 .7 .6: n=1 2*.1=.2 <1, n=2 3*.2=.6 <1, n=3 4*.3=1.2 -> n=2
        [0.2, 0.1, 0.3, 0.05],   # n=1 2*.7=1.4 fails: at least one, the most confident (slot 2)
        [0.99, 0.98, 0.4, 0.3],  # candidates .4 .3 only: n=1 2*.6=1.2 fails -> 1 (slot 2)
        [0.99, 0.99, 0.99, 0.99],  # n=4 5*.01=.05 <1: every slot
        [0.9, 0.9, 0.9, 0.9],    # no candidate: nothing
    ])
    cand = bits([ALL, ALL, [0, 0, 1, 1], ALL, NONE])
    assert as_bits(commit_factor(conf, cand, 1.0)) == [
        [0, 1, 0, 1],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
        ALL,
        NONE,
    ]


def test_factor_uses_n_plus_one_and_a_strict_inequality():
    # c = .875 .5 .25 .125: n=1 2*.125=.25, n=2 3*.5=1.5, n=3 4*.75=3, n=4 5*.875=4.375
    conf = f32([[0.25, 0.875, 0.125, 0.5]])
    cand = bits([ALL])
    assert as_bits(commit_factor(conf, cand, 1.5)) == [[0, 1, 0, 0]]      # 1.5 < 1.5 fails: n=1
    assert as_bits(commit_factor(conf, cand, 1.625)) == [[0, 1, 0, 1]]    # n=2
    assert as_bits(commit_factor(conf, cand, 3.0)) == [[0, 1, 0, 1]]      # 3 < 3 fails: still n=2
    assert as_bits(commit_factor(conf, cand, 3.125)) == [[1, 1, 0, 1]]    # n=3
    assert as_bits(commit_factor(conf, cand, 4.5)) == [ALL]               # n=4
    # an n * (1 - c_n) rule would take n=2 at f=1.5 (2*.5=1 < 1.5) and n=3 at f=3 (3*.75=2.25 < 3)


def test_factor_zero_confidence_candidates_count():
    # candidates at confidence 0: n=1 2*1=2 <10, n=2 3*1=3 <10 -> both; decided slots stay out
    conf = f32([[0.0, 0.0, 0.9, 0.9]])
    cand = bits([[1, 1, 0, 0]])
    assert as_bits(commit_factor(conf, cand, 10.0)) == [[1, 1, 0, 0]]


# --- entropy (EB sampler): ascending H, the largest k with sum(H_1..k) - max(H_1..k) <= gamma ---

def test_entropy_table():
    inf = math.inf
    ent = f32([
        [0.5, 0.125, 0.375, 0.25],   # H = .125 .25 .375 .5: k=3 .75-.375=.375 <= .375, k=4 1.25-.5=.75 -> k=3
        [2.0, 1.0, 3.0, 1.5],        # k=2 2.5-1.5=1 > .375: the lowest-entropy slot alone
        [0.125, 0.5, 0.625, 0.25],   # decided slot 0 not counted: H = .25 .5 .625, k=2 .25, k=3 .75 -> k=2
        [inf, 0.25, 0.375, inf],     # the engine's inf on decided slots: H = .25 .375, k=2 .25 -> both
        [0.0, 0.0, 0.0, 0.0],        # no candidate: nothing
    ])
    # confidences deliberately disagree with the entropy order: the rule must not read them
    conf = f32([[0.9, 0.1, 0.2, 0.3], [0.1, 0.2, 0.9, 0.3], [0.9, 0.9, 0.9, 0.1], [0.5, 0.1, 0.9, 0.5],
                [0.9, 0.9, 0.9, 0.9]])
    cand = bits([ALL, ALL, [0, 1, 1, 1], [0, 1, 1, 0], NONE])
    assert as_bits(commit_entropy(conf, ent, cand, 0.375)) == [
        [0, 1, 1, 1],
        [0, 1, 0, 0],
        [0, 1, 0, 1],
        [0, 1, 1, 0],
        NONE,
    ]
    # a rule without "- max" (sum <= gamma) would give row 0 k=2; one counting decided slot 0 of
    # row 2 (H = .125 .25 .5 .625: k=3 .375 <= .375) would commit three candidates there


def test_entropy_gamma_zero():
    # gamma 0: one slot, unless entropies are 0; the largest H of the prefix is free
    ent = f32([[0.5, 0.25, 0.75, 1.0], [0.0, 0.75, 0.0, 0.0]])
    conf = f32([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    cand = bits([ALL, [1, 1, 1, 0]])
    # row 0: k=2 .25+.5-.5=.25 > 0 -> k=1; row 1: H = 0 0 .75, k=3 .75-.75=0 <= 0 -> all three
    assert as_bits(commit_entropy(conf, ent, cand, 0.0)) == [[0, 1, 0, 0], [1, 1, 1, 0]]


# --- steps: the k most confident candidates --------------------------------------------------

def test_steps_table():
    conf = f32([[0.1, 0.9, 0.5, 0.7],     # k=2: slots 1 and 3
                [0.99, 0.2, 0.98, 0.3],   # slot 2 decided: 0.99 and 0.3
                [0.9, 0.1, 0.2, 0.9],     # one candidate, fewer than k: it alone
                [0.9, 0.9, 0.9, 0.9]])    # no candidate: nothing
    cand = bits([ALL, [1, 1, 0, 1], [0, 1, 0, 0], NONE])
    assert as_bits(commit_steps(conf, cand, 2)) == [[0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 0], NONE]
    assert as_bits(commit_steps(conf, cand, 1)) == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], NONE]
    assert as_bits(commit_steps(conf, cand, 4)) == [ALL, [1, 1, 0, 1], [0, 1, 0, 0], NONE]


def test_steps_ignore_how_confident_the_slots_are():
    conf = f32([[0.01, 0.02, 0.03, 0.04], [1.0, 1.0, 1.0, 1.0]])
    got = commit_steps(conf, bits([ALL, ALL]), 3)
    assert got[0].tolist() == [False, True, True, True] and int(got[1].sum()) == 3


# --- at_least_one -------------------------------------------------------------------------

def test_at_least_one_adds_the_top_candidate_to_an_empty_row_only_where_there_are_candidates():
    conf = f32([[0.1, 0.4, 0.3, 0.2], [0.9, 0.1, 0.3, 0.2], [0.9, 0.1, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5]])
    cand = bits([ALL, [0, 1, 1, 1], [0, 1, 1, 1], NONE])
    commit = bits([NONE, NONE, [0, 1, 0, 0], NONE])
    got = at_least_one(commit, conf, cand)
    assert as_bits(got[:2]) == [[0, 1, 0, 0], [0, 0, 1, 0]]  # the top candidate, never decided slot 0
    assert got[2, 1] and int(got[2].sum()) >= 1 and not got[2, 0]  # what was committed stays
    assert as_bits(got[3:]) == [NONE]


# --- accepted_drafts ------------------------------------------------------------------------

@pytest.mark.parametrize(("drafts", "greedy", "n"), [
    ([], [7], 0),
    ([3, 4, 5], [3, 4, 5, 6], 3),    # every draft matches
    ([3, 4, 5], [9, 4, 5, 6], 0),    # the first differs: nothing, even though later ones match
    ([3, 4, 5], [3, 9, 5, 6], 1),    # stops at the first mismatch
    ([3, 4, 5], [3, 4, 9, 6], 2),
])
def test_accepted_drafts(drafts, greedy, n):
    assert accepted_drafts(drafts, greedy) == n


# --- pick_tokens -----------------------------------------------------------------------------

def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))  # log p: softmax gives p back


def test_pick_tokens_greedy_confidence_and_entropy():
    logits = logits_of([[[0.25, 0.5, 0.25], [0.125, 0.125, 0.75]]])  # [1, 2, 3]
    logits[0, 1, 0] = -math.inf  # a forbidden id: probability 0, adds nothing to the entropy
    tokens, conf, ent = pick_tokens(logits, 0.0, 1.0)
    assert tokens.tolist() == [[1, 2]]
    # row 1 renormalised over ids 1, 2: p = 1/7, 6/7
    torch.testing.assert_close(conf, torch.tensor([[0.5, 6 / 7]]))
    h1 = -(1 / 7 * math.log(1 / 7) + 6 / 7 * math.log(6 / 7))
    torch.testing.assert_close(ent, torch.tensor([[1.5 * math.log(2), h1]]))
    tokens2, conf2, ent2 = pick_tokens(logits, 0.0, 1.0, entropy=False)  # the fast greedy path
    assert tokens2.tolist() == [[1, 2]] and ent2 is None
    torch.testing.assert_close(conf2, conf)


def test_pick_tokens_sampling_with_temperature_and_top_p():
    gen = torch.Generator().manual_seed(0)
    # temperature 0.5 squares p before renormalising: [1, 2] -> [1, 4] / 5
    logits = logits_of([[[1 / 3, 2 / 3]]])
    seen = set()
    for _ in range(200):
        tok, conf, ent = pick_tokens(logits, 0.5, 1.0, gen)
        want = {0: 0.2, 1: 0.8}[int(tok)]
        torch.testing.assert_close(conf, torch.tensor([[want]]))
        seen.add(int(tok))
    assert seen == {0, 1}
    torch.testing.assert_close(ent, torch.tensor([[-(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]]))

    # top_p 0.6 over p = .5 .3 .2: the smallest prefix reaching 0.6 is {0, 1}; renormalised .625 .375
    logits = logits_of([[[0.3, 0.5, 0.2]]])
    seen = set()
    for _ in range(200):
        tok, conf, _ = pick_tokens(logits, 1.0, 0.6, gen, entropy=False)
        want = {1: 0.625, 0: 0.375}[int(tok)]  # a KeyError here: slot 2 was sampled outside top_p
        torch.testing.assert_close(conf, torch.tensor([[want]]))
        seen.add(int(tok))
    assert seen == {0, 1}


def test_pick_tokens_top_p_exactly_reached_keeps_that_prefix_only():
    logits = logits_of([[[0.5, 0.25, 0.25]]])  # softmax gives exactly .5 .25 .25 in float32
    gen = torch.Generator().manual_seed(0)
    assert {int(pick_tokens(logits, 1.0, 0.5, gen, entropy=False)[0]) for _ in range(100)} == {0}
