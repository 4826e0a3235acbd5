"""Tiny random models built from configs: no hub, no weights on disk."""

from __future__ import annotations

import pytest
import torch

from edlm.testing import ARCHITECTURES, make_tiny_causal_lm, make_tiny_tokenizer  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer directory, the stand-in for a user's AR checkpoint."""
    out = tmp_path_factory.mktemp("tiny_ar")
    model = make_tiny_causal_lm("llama")
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out
