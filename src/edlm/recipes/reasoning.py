"""A built-in, deterministic generator of GSM8K-style arithmetic word problems.

Each problem has 2-4 reasoning steps over multi-digit numbers and a worked solution ending in
`#### <answer>`, so exact match on the final answer is a faithful score and parallel decoding
has something to get wrong (carried digits, intermediate results reused later).
Problem i of a split is a pure function of (split seed, i): the data never has to be stored.
The test split uses its own seed and every test question is excluded from training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo",
         "Mia", "Ned", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Zoe"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "cards", "shells", "pens", "eggs",
         "stickers", "beads", "rocks", "cookies", "toys", "plums", "nails"]
CONTAINERS = ["bags", "boxes", "jars", "packs", "crates", "baskets"]

SPLIT_SEEDS = {"train": 1_000_003, "test": 7_000_001}
TEST_SIZE = 500


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked steps, ending with "#### <answer>"
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def response(self) -> str:
        return f" {self.solution}"

    @property
    def text(self) -> str:
        return self.prompt + self.response


def _step(rng: random.Random, total: int, item: str, name: str):
    """One operation on the running total: (sentence, equation, new_total) or None if invalid."""
    kind = rng.choice(["buy", "lose", "groups", "share", "double"])
    if kind == "buy":
        n = rng.randint(2, 99)
        return f"{name} gets {n} more {item}.", f"{total}+{n}={total + n}", total + n
    if kind == "lose" and total > 2:
        n = rng.randint(1, total - 1)
        verb = rng.choice(["gives away", "loses", "sells"])
        return f"{name} {verb} {n} {item}.", f"{total}-{n}={total - n}", total - n
    if kind == "groups":
        k, each = rng.randint(2, 9), rng.randint(2, 40)
        box = rng.choice(CONTAINERS)
        prod = k * each
        return (f"{name} buys {k} {box} with {each} {item} in each.",
                f"{k}*{each}={prod}. {total}+{prod}={total + prod}", total + prod)
    if kind == "share":
        divisors = [d for d in range(2, 10) if total % d == 0 and total // d >= 1]
        if divisors:
            d = rng.choice(divisors)
            return (f"{name} splits the {item} into {d} equal piles and keeps one pile.",
                    f"{total}/{d}={total // d}", total // d)
    if kind == "double" and total < 500:
        return f"{name} doubles the number of {item}.", f"{total}*2={total * 2}", total * 2
    return None


def make_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(10, 200)
    sentences = [f"{name} has {total} {item}."]
    equations = []
    n_steps = rng.randint(2, 4)
    while len(equations) < n_steps:
        step = _step(rng, total, item, name)
        if step is None or step[2] >= 1000:
            continue
        sentence, equation, total = step
        sentences.append(sentence)
        equations.append(equation)
    sentences.append(f"How many {item} does {name} have now?")
    solution = ". ".join(equations) + f". #### {total}"
    return Problem(" ".join(sentences), solution, total)


def problem(split: str, index: int) -> Problem:
    return make_problem(random.Random(SPLIT_SEEDS[split] * 1_000_003 + index))


@lru_cache(maxsize=1)
def _test_questions() -> frozenset[str]:
    return frozenset(problem("test", i).question for i in range(TEST_SIZE))


def test_problems(n: int = TEST_SIZE) -> list[Problem]:
    if n > TEST_SIZE:
        raise ValueError(f"the held-out split has {TEST_SIZE} problems, asked for {n}")
    return [problem("test", i) for i in range(n)]


def train_problems(n: int, start: int = 0):
    """Training problems, skipping any whose question is in the held-out split."""
    held_out = _test_questions()
    i, made = start, 0
    while made < n:
        p = problem("train", i)
        i += 1
        if p.question in held_out:
            continue
        made += 1
        yield p


_ANSWER = re.compile(r"####\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def exact_match(completion: str, problem: Problem) -> bool:
    return extract_answer(completion) == problem.answer
