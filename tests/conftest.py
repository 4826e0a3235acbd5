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


@pytest.fixture(scope="session")
def tiny_dlm_dir(tiny_ar_dir, tmp_path_factory):
    """tiny_ar_dir converted at block size 4: a dLM checkpoint dir for tests that only read it."""
    from edlm.train.convert import convert

    out = tmp_path_factory.mktemp("tiny_dlm") / "dlm"
    convert(tiny_ar_dir, out, block_size=4)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention (10x slower per call)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def _aot_cache(tmp_path_factory):
    """AOT programs the suite compiles are kept in its own folder, never the user's ~/.cache."""
    import os

    old = os.environ.get("EDLM_CACHE_DIR")
    os.environ["EDLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("edlm-cache"))
    yield
    if old is None:
        os.environ.pop("EDLM_CACHE_DIR", None)
    else:
        os.environ["EDLM_CACHE_DIR"] = old
