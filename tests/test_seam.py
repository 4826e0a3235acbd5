"""The decode package's structure: one model-call site, one loop, host syncs counted, short functions."""

import ast
import collections
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import edlm.decode
from edlm.decode.engine import BlockDecoder
from edlm.decode.loop import decode_loop
from edlm.decode.options import DecodeOptions, resolve_rows
from edlm.decode.state import Outputs
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

DECODE = Path(edlm.decode.__file__).parent
# ops that make the host wait for the device: reading a value (item, bool, int), data-dependent
# shapes (nonzero, boolean masks, masked_select), comparisons answered on the host (equal)
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
            "aten.is_nonzero.default", "aten.masked_select.default", "aten.unique.default"}


class HostSyncs(TorchDispatchMode):
    """Counts host syncs of everything run under it, model forwards included, as a CUDA device
    would make them: the sync ops above and every Tensor.tolist (which bypasses dispatch)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNC_OPS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counts, tolist = self.counts, self._tolist

        def counted(t):
            counts["tolist"] += 1
            return tolist(t)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def tiny_dlm(shift=False, block_size=4):
    return convert_model(make_tiny_causal_lm("llama", dtype=torch.float64), make_tiny_tokenizer(),
                         block_size=block_size, shift=shift)


@pytest.mark.parametrize("strategy", ["threshold", "prefix", "factor", "entropy", "steps"])
@pytest.mark.parametrize("shift", [False, True])
def test_a_plain_step_syncs_with_the_host_at_most_once(strategy, shift):
    """Batch 1, the plain path: at most one host sync per step, the model's forward included
    (the one read is BlockDecoder.step's; stats stay on the host from it)."""
    dlm = tiny_dlm(shift)
    with HostSyncs() as syncs:
        res = dlm.generate("Once upon a time", max_new_tokens=13, strategy=strategy,
                           **({"threshold": 0.3} if strategy in ("threshold", "prefix") else {}))
    steps = res.stats[0].model_calls
    assert steps >= 4
    assert sum(syncs.counts.values()) <= steps, dict(syncs.counts)


def test_model_calls_are_counted_where_they_are_made():
    """The stats' model calls are the batch's count of forwards (KVRows.forward), for every row."""
    dlm = tiny_dlm()
    opts = DecodeOptions.resolve(dlm, strategy="lossless", draft_depth=3)
    ids, budgets, stops = resolve_rows(dlm, ["Once upon a time", "ab"], [9, 9], None)
    out, decoder, result = Outputs(dlm), BlockDecoder(dlm, opts), []
    decoder.add(out.add_rows(budgets, stops), ids, budgets)
    forwards = []
    orig = decoder.batch.forward

    def counted(*args, **kwargs):
        forwards.append(1)
        return orig(*args, **kwargs)

    decoder.batch.forward = counted
    list(decode_loop(decoder, out, result=result))
    assert decoder.batch.calls == len(forwards) > 0
    assert max(s.model_calls for s in result[0].stats) == len(forwards)  # the row decoding longest


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_decoding_and_scoring_call_the_model_in_one_place():
    """The network (`<x>.model` or `<x>.compiled_model`, taken as a value: called, or bound to a name
    to call) is touched only in kv.model_forward; `x.model.<attr>` (an embedding table) is not a call."""
    sites = []
    for path in DECODE.glob("*.py"):
        for fn in _functions(path):
            inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
            for node in ast.walk(fn):
                if (isinstance(node, ast.Attribute) and node.attr in ("model", "compiled_model")
                        and id(node) not in inner):
                    sites.append(f"{path.name}:{fn.name}")
    assert sorted(set(sites)) == ["kv.py:model_forward"]


def test_no_function_in_decode_is_over_60_lines():
    long = [f"{p.name}:{fn.name} ({fn.end_lineno - fn.lineno + 1})" for p in DECODE.glob("*.py")
            for fn in _functions(p) if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long


def test_one_loop_drives_every_decoder():
    """engine, verified and the two-model drafter have no loop of their own over steps."""
    for name in ("engine.py", "selfverify.py", "verify.py"):
        for fn in _functions(DECODE / name):
            whiles = [n for n in ast.walk(fn) if isinstance(n, ast.While)]
            assert not whiles, f"{name}:{fn.name} loops over steps itself"


def test_resolved_options_and_options_one_by_one_are_not_mixed():
    dlm = tiny_dlm()
    opts = DecodeOptions.resolve(dlm, strategy="prefix")
    with pytest.raises(EdlmError, match="threshold="):
        dlm.generate("ab", max_new_tokens=4, options=opts, threshold=0.3)
    assert dlm.generate("ab", max_new_tokens=4, options=opts, threshold=None).token_ids  # None is unset
