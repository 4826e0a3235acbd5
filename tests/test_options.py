"""Decode options declared once: the engine defaults, the range checks, `edlm generate`'s flags,
the server's request fields and the strategies' `reads` all derive from DecodeOptions' fields;
remask_below (the worked example) reaches WINO from every entrance; the two-model mode
(--verifier) accepts and refuses the same options in the CLI and the server."""

import json
import math
from dataclasses import MISSING, fields

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from edlm.cli import build_parser, main  # noqa: E402
from edlm.decode.options import (  # noqa: E402
    ENGINE_DEFAULTS,
    DecodeOptionError,
    DecodeOptions,
    declared_options,
    resolve_parent_verified,
)
from edlm.decode.strategies import STRATEGIES, strategies_reading  # noqa: E402
from edlm.errors import EdlmError  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402
from edlm.serve.app import ChatRequest, CompletionRequest, create_app  # noqa: E402
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer  # noqa: E402
from edlm.train.convert import convert_model  # noqa: E402

NAME = "tiny-dlm"
WINO = {"strategy": "wino", "threshold": 0.5}
PROMPTS = ["The cat sat", "Hello, wor", "Once upon a time there"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    old = torch.get_num_threads()  # tiny models on shared cores: intra-op threads only add contention
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    """A saved dLM whose LM head is scaled up: confident enough that WINO commits several drafts
    per forward, so re-masking has something to take back (a plain tiny model commits one)."""
    model = make_tiny_causal_lm("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    out = tmp_path_factory.mktemp("options") / "sharp"
    convert_model(model, make_tiny_tokenizer(), block_size=8).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dlm_dir(tiny_dlm_dir):  # the converted tiny model of conftest, read only
    return tiny_dlm_dir


def load(path, **kw):
    return DiffusionLM.from_pretrained(path, device="cpu", dtype=torch.float32, **kw)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def out_of_range(spec) -> list:
    """Values just outside the declared range, at each bounded end."""
    if spec.kind is str:
        return ["magic"]
    step = 1 if spec.kind is int else 0.5
    bad = [spec.low if spec.low_open else spec.low - step]
    if math.isfinite(spec.high):
        bad.append(spec.high if spec.high_open else spec.high + step)
    return bad


def closed_ends(spec) -> list:
    return [v for v, is_open in ((spec.low, spec.low_open), (spec.high, spec.high_open))
            if spec.kind is not str and math.isfinite(v) and not is_open]


BAD = [(s.name, v) for s in declared_options() for v in out_of_range(s)]


# ------------------------------------------------------------------ everything derives from the declaration
def test_engine_defaults_are_the_declared_defaults(dlm_dir):
    declared = {f.name: f.default for f in fields(DecodeOptions) if f.default is not MISSING}
    assert ENGINE_DEFAULTS == declared and "block_size" not in declared  # block_size: the model's
    assert ENGINE_DEFAULTS["remask_below"] == 0.9
    dlm = load(dlm_dir)
    assert DecodeOptions.resolve(dlm) == DecodeOptions(block_size=dlm.config.block_size)


def test_every_option_has_a_generate_flag_with_its_default_in_the_help():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    actions = {a.option_strings[0]: a for a in generate._actions if a.option_strings}
    for spec in declared_options():
        action = actions[flag(spec.name)]
        shown = "the model's" if spec.default is MISSING else f"the model's, else {spec.default}"
        span = "" if spec.kind is str else f", {spec.span()}"
        assert action.help == f"{spec.help}{span} (default: {shown})"
        assert action.type is spec.kind and action.default is None  # unset: the checkpoint's config may win
    assert actions["--remask-below"].help.endswith(", in (0, 1] (default: the model's, else 0.9)")
    assert actions["--factor"].help.endswith(", > 0 (default: the model's, else 1.0)")


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
def test_every_option_is_a_request_field_with_the_declared_range(request_type):
    base = {"model": NAME, "prompt": "ab"} if request_type is CompletionRequest else \
        {"model": NAME, "messages": [{"role": "user", "content": "ab"}]}
    for spec in declared_options():
        assert spec.name in request_type.model_fields
        for value in closed_ends(spec):  # the closed ends are inside: same range, not a narrower one
            request_type.model_validate({**base, spec.name: spec.kind(value)})
            spec.check(spec.kind(value))
        for value in out_of_range(spec):
            with pytest.raises(DecodeOptionError) as err:
                spec.check(value)
            assert err.value.option == spec.name


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_an_out_of_range_option_is_refused_by_name_everywhere(dlm_dir, capsys, name, value):
    dlm = load(dlm_dir)
    with pytest.raises(DecodeOptionError) as err:
        dlm.generate("ab", max_new_tokens=2, **{name: value})
    assert err.value.option == name
    assert main(["generate", str(dlm_dir), "--prompt", "ab", flag(name), str(value)]) == 2
    message = capsys.readouterr().err
    assert (name if name != "block_size" else "block size") in message and "Traceback" not in message
    with TestClient(create_app(dlm, NAME)) as client:
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "ab", name: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_reads_derive_from_read_by():
    for spec in declared_options():
        assert set(strategies_reading(spec.name)) == set(spec.read_by)
        assert all(spec.name in STRATEGIES[s].reads for s in spec.read_by)
    assert strategies_reading("remask_below") == ("wino",) and "remask_below" in STRATEGIES["wino"].reads
    assert strategies_reading("threshold") == ("threshold", "prefix", "psd", "soft", "wino")
    assert "draft_depth" in STRATEGIES["psd"].reads and "draft_depth" not in STRATEGIES["soft"].reads


# ------------------------------------------------------------------ the worked example: remask_below
def test_remask_below_changes_wino_from_python_cli_and_server(sharp_dir, capsys):
    dlm = load(sharp_dir)
    loose = dlm.generate(PROMPTS, max_new_tokens=16, remask_below=1e-300, **WINO)  # nothing is that weak
    strict = dlm.generate(PROMPTS, max_new_tokens=16, remask_below=1.0, **WINO)  # every earlier draft is suspect
    assert loose.token_ids == dlm.generate(PROMPTS, max_new_tokens=16, threshold=0.5).token_ids
    calls = {bar: sum(s.model_calls for s in r.stats) for bar, r in ((1e-300, loose), (1.0, strict))}
    assert calls[1.0] > calls[1e-300]  # re-masking really happened, and costs forwards
    with TestClient(create_app(dlm, NAME)) as client:
        for bar in (1e-300, 1.0):
            for prompt in PROMPTS:
                want = dlm.generate(prompt, max_new_tokens=16, remask_below=bar, **WINO)
                assert main(["generate", str(sharp_dir), "--prompt", prompt, "--max-new-tokens", "16", "--json",
                             "--strategy", "wino", "--threshold", "0.5", "--remask-below", str(bar)]) == 0
                got = json.loads(capsys.readouterr().out)
                assert (got["token_ids"], got["model_calls"]) == (want.token_ids[0], want.stats[0].model_calls)
                r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 16,
                                                         "remask_below": bar, **WINO}).json()
                assert (r["choices"][0]["text"], r["usage"]["model_calls"]) == \
                    (want.texts[0], want.stats[0].model_calls)


# ------------------------------------------------------------------ the two-model rule
def test_resolve_parent_verified(dlm_dir):
    dlm = load(dlm_dir)
    assert resolve_parent_verified(dlm) == dlm.config.block_size == 4
    assert resolve_parent_verified(dlm, block_size=2, threshold=None) == 2  # None is unset
    with pytest.raises(DecodeOptionError, match="greedily") as err:
        resolve_parent_verified(dlm, block_size=2, temperature=0.0, threshold=0.5)
    assert err.value.option == "threshold"  # the first one set in declaration order, not call order
    for bad in (0, 100000, 2.0):
        with pytest.raises(DecodeOptionError) as err:
            resolve_parent_verified(dlm, block_size=bad)
        assert err.value.option == "block_size"
    with pytest.raises(EdlmError, match="unknown decode option"):
        resolve_parent_verified(dlm, blocksize=2)


TWO_MODEL = [  # (options set, the option refused or None)
    ({}, None), ({"block_size": 2}, None), ({"threshold": 0.5}, "threshold"), ({"temperature": 0.0}, "temperature"),
    ({"block_size": 2, "strategy": "psd"}, "strategy"), ({"remask_below": 0.5}, "remask_below"),
    ({"seed": 1}, "seed"), ({"block_size": 0}, "block_size"), ({"block_size": 100000}, "block_size"),
]


def test_the_two_model_rule_is_the_same_in_cli_and_server(tiny_ar_dir, dlm_dir, capsys):
    dlm, ar = load(dlm_dir), load(tiny_ar_dir, autoregressive=True)
    app = create_app(dlm, NAME, verifier=ar)
    queued, submit = [], app.state.worker.submit
    app.state.worker.submit = lambda job: (queued.append(job.options.block_size), submit(job))[1]
    with TestClient(app) as client:
        for given, refused in TWO_MODEL:
            argv = [x for k, v in given.items() for x in (flag(k), str(v))]
            code = main(["generate", str(dlm_dir), "--prompt", "ab", "--max-new-tokens", "4", "--json",
                         "--verifier", str(tiny_ar_dir), *argv])
            out = capsys.readouterr()
            r = client.post("/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 4, **given})
            if refused is None:
                bs = given.get("block_size", dlm.config.block_size)
                want = dlm.generate("ab", max_new_tokens=4, verifier=ar, block_size=bs)
                got = json.loads(out.out)
                assert code == 0 and (got["token_ids"], got["model_calls"]) == \
                    (want.token_ids[0], want.stats[0].model_calls), out.err
                assert r.status_code == 200, r.text
                assert (r.json()["choices"][0]["text"], r.json()["usage"]["model_calls"]) == \
                    (want.texts[0], want.stats[0].model_calls)
                assert queued.pop() == bs  # the worker is told the block size to draft with
            else:
                assert code == 2 and refused.replace("block_size", "block size") in out.err, (given, out.err)
                assert r.status_code == 400 and r.json()["error"]["param"] == refused, (given, r.text)
        assert queued == []  # refused requests never reached the worker


# ------------------------------------------------------------------ options a strategy does not read
def _dlm(decoding=None):
    import torch

    from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
    from edlm.train.convert import convert_model

    dlm = convert_model(make_tiny_causal_lm("llama", dtype=torch.float64), make_tiny_tokenizer(), block_size=4)
    dlm.config.decoding = decoding or {}
    return dlm


@pytest.mark.parametrize(("kw", "option"), [
    ({"strategy": "lossless", "threshold": 0.5}, "threshold"),
    ({"strategy": "factor", "gamma": 0.1}, "gamma"),
    ({"strategy": "psd", "top_p": 0.5}, "top_p"),
    ({"strategy": "wino", "draft_depth": 2}, "draft_depth"),
    ({"strategy": "steps", "remask_below": 0.5}, "remask_below"),
])
def test_an_option_the_strategy_does_not_read_is_refused_by_name(kw, option):
    from edlm.decode.options import DecodeOptionError

    with pytest.raises(DecodeOptionError, match=rf"{option} does not apply to strategy '{kw['strategy']}'"):
        _dlm().generate("ab", max_new_tokens=4, **kw)


def test_the_checkpoints_default_strategy_decides_what_a_bare_option_means():
    """The demo dLM's case: its default is a strategy that reads no threshold, so a threshold alone is
    refused (it used to be ignored without a word), and with a strategy that reads it, it applies."""
    from edlm.decode.options import DecodeOptionError, DecodeOptions

    dlm = _dlm({"strategy": "lossless", "draft_depth": 2})
    with pytest.raises(DecodeOptionError, match="threshold does not apply to strategy 'lossless'"):
        DecodeOptions.resolve(dlm, threshold=0.3)
    assert DecodeOptions.resolve(dlm, strategy="prefix", threshold=0.3).threshold == 0.3
    # greedy no-ops and a seed are accepted anywhere: clients send them by habit
    assert DecodeOptions.resolve(dlm, temperature=0.0, top_p=1.0, seed=7).strategy == "lossless"


def test_stored_settings_apply_per_strategy():
    """A setting stored beside the default strategy that it reads stays its own (draft_depth 1 for
    verified never reaches lossless/psd); one it does not read is shared with the strategies that
    read it; "strategies" holds settings of others."""
    from edlm.decode.options import ENGINE_DEFAULTS, DecodeOptions

    dlm = _dlm({"strategy": "lossless", "draft_depth": 2, "threshold": 0.95,
                "strategies": {"psd": {"draft_depth": 3}, "factor": {"factor": 2.5}}})
    assert DecodeOptions.resolve(dlm).draft_depth == 2
    assert DecodeOptions.resolve(dlm, strategy="psd").draft_depth == 3
    assert DecodeOptions.resolve(dlm, strategy="psd").threshold == 0.95  # shared: lossless reads none
    assert DecodeOptions.resolve(dlm, strategy="prefix").threshold == 0.95
    assert DecodeOptions.resolve(dlm, strategy="factor").factor == 2.5
    dlm.config.decoding = {"strategy": "lossless", "draft_depth": 2}
    assert DecodeOptions.resolve(dlm, strategy="psd").draft_depth == ENGINE_DEFAULTS["draft_depth"]


@pytest.mark.parametrize("stop", ["", ["x", ""]])
def test_an_empty_stop_string_is_refused(stop):
    from edlm.decode.options import DecodeOptionError

    with pytest.raises(DecodeOptionError, match="empty stop string"):
        _dlm().generate("ab", max_new_tokens=4, stop=stop)


def test_a_seed_beyond_64_bits_is_refused():
    from edlm.decode.options import DecodeOptionError

    with pytest.raises(DecodeOptionError, match="seed must be in"):
        _dlm().generate("ab", max_new_tokens=4, seed=2**64)
