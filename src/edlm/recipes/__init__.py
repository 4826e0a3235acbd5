"""Recipes: the demo models' builds, benches and studies, each a module runnable with `python -m`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from edlm.errors import EdlmError


def run_recipe(main: Callable[[], object]) -> None:
    """`python -m edlm.recipes.NAME`: a user mistake (a bad path or flag, an EdlmError) ends in one
    line and exit status 2, as under `edlm`, instead of a traceback."""
    try:
        main()
    except EdlmError as exc:
        print(f"{Path(sys.argv[0]).stem}: error: {exc}", file=sys.stderr)
        sys.exit(2)
