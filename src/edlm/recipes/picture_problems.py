"""The VLM demo's task: the built-in reasoning problems with their starting number shown as a picture.

"Question: Ben has <image> shells. Ben gets 96 more shells. ... How many shells does Ben have
now?" with a 42x42 card whose digits (one per 14-pixel cell of its middle row, right-aligned, random
colours and a pixel of jitter) give the starting amount; the worked answer is the text demo's ("52+96=148. ...
#### 110"), so the first equation reads the picture and the rest reasons on it. Exact match on
the final number scores it, as in `edlm.recipes.reasoning`; problem i of a split and its card are
pure functions of (split, i), and the held-out split is the reasoning test split.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from edlm.recipes import reasoning

CELL, GRID = 14, 3  # a card is GRID x GRID cells of CELL pixels: one digit a cell (a CLIP patch)
CARD = CELL * GRID
PLACEHOLDER = "<image>"  # the demo VLM's image token (LLaVA's), where the card goes in the prompt
_OPENING = re.compile(r"^(\w+) has (\d+) (\w+)\.")


@dataclass(frozen=True)
class PictureProblem:
    question: str  # with one "{image}" where the card goes
    solution: str
    number: int  # what the card shows
    seed: int  # the card's look

    def prompt(self, placeholder: str) -> str:
        return "Question: " + self.question.format(image=placeholder) + "\nAnswer:"

    @property
    def response(self) -> str:
        return f" {self.solution}"

    def card(self):
        return render_card(self.number, random.Random(self.seed))


def from_problem(p: reasoning.Problem, seed: int) -> PictureProblem:
    m = _OPENING.match(p.question)
    assert m is not None, p.question  # every generated problem opens "Name has N items."
    question = f"{m.group(1)} has {{image}} {m.group(3)}." + p.question[m.end():]
    return PictureProblem(question, p.solution, int(m.group(2)), seed)


def render_card(number: int, rng: random.Random):
    """The digits of `number`, right-aligned in the middle row of cells, dark on a mid-grey background.

    Mid-grey because the CLIP-style processor maps it to about 0: a blank 14-pixel cell is then a
    near-zero patch and a digit's strokes are the whole signal. On a light background (measured)
    every patch embedding is dominated by the background, and a 2-layer tower trained from scratch
    read 12% of last digits after 150 supervised steps."""
    from PIL import Image, ImageDraw, ImageFont

    background = tuple(rng.randint(105, 150) for _ in range(3))
    ink = tuple(rng.randint(0, 45) for _ in range(3))
    image = Image.new("RGB", (CARD, CARD), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=CELL)
    row, digits = GRID // 2, str(number)
    for i, d in enumerate(digits):
        col = GRID - len(digits) + i
        draw.text((col * CELL + 3 + rng.randint(-1, 1), row * CELL - 2 + rng.randint(-1, 1)), d, fill=ink, font=font)
    return image


def test_problems(n: int = reasoning.TEST_SIZE) -> list[PictureProblem]:
    return [from_problem(p, seed=10_000_019 * (i + 1)) for i, p in enumerate(reasoning.test_problems(n))]


def train_problems(n: int, start: int = 0):
    for i, p in enumerate(reasoning.train_problems(n, start)):
        yield from_problem(p, seed=start + i)
