"""lm-eval adapter: estimator exactness by hand, and real simple_evaluate runs on local YAML tasks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from edlm.cli import main  # noqa: E402
from edlm.decode.kv import candidate_logits  # noqa: E402
from edlm.recipes.evaluate import EdlmLM  # noqa: E402
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer  # noqa: E402
from edlm.train.convert import convert  # noqa: E402

GEN_TASK = """task: edlm_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: edlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny AR dir, its conversions (block 4, with and without shift), and two local tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    ar = root / "ar"
    make_tiny_causal_lm("llama").save_pretrained(ar)
    make_tiny_tokenizer().save_pretrained(ar)
    convert(ar, root / "dlm", block_size=4)
    convert(ar, root / "dlm_shift", block_size=4, shift=True)
    tasks = root / "tasks"
    tasks.mkdir()
    gen = [{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2)]]
    mc = [{"question": f"Colour {i}:", "choices": [" red", " blue", " green"], "label": i % 3} for i in range(4)]
    for name, rows in [("gen", gen), ("mc", mc)]:
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = dict(cache=root / "hf_cache")
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=tasks / "gen.jsonl", **fmt))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl", **fmt))
    return {"ar": ar, "dlm": root / "dlm", "dlm_shift": root / "dlm_shift", "tasks": tasks}


def by_hand(lm: EdlmLM, context: list[int], continuation: list[int]) -> float:
    """Sum over continuation tokens of log p(token) with later positions masked, via forward_noisy."""
    dlm, bs = lm.dlm, lm.block_size
    x = context + continuation
    pad = -len(x) % bs
    mask = dlm.config.mask_token_id
    total = 0.0
    for p in range(len(context), len(x)):
        noisy = torch.tensor([x[:p] + [mask] * (len(x) - p + pad)])
        clean = torch.tensor([x + [mask] * pad])
        logits = dlm.forward_noisy(noisy, clean, block_size=bs)[0, p]
        total += candidate_logits(dlm, logits.float()).log_softmax(-1)[x[p]].item()
    return total


@pytest.mark.parametrize("which", ["dlm", "dlm_shift"])
def test_left_to_right_matches_forward_noisy_by_hand(dirs, which):
    lm = EdlmLM(pretrained=str(dirs[which]), device="cpu", batch_size=2)
    reqs = [([5, 6, 7, 8, 9], [10]),  # one token, context ends on a block boundary
            ([5, 6, 7], [10, 11, 12, 13, 14, 15])]  # crosses two block boundaries
    got = lm._loglikelihood_tokens([(None, c, y) for c, y in reqs], disable_tqdm=True)
    for (c, y), (lp, _) in zip(reqs, got, strict=True):
        assert lp == pytest.approx(by_hand(lm, c, y), abs=1e-4)


def test_is_greedy_and_one_token_logprob(dirs):
    lm = EdlmLM(pretrained=str(dirs["dlm"]), device="cpu")
    dlm, context = lm.dlm, [5, 6, 7]
    noisy = torch.tensor([context + [dlm.config.mask_token_id]])
    logits = dlm.model(input_ids=noisy, attention_mask=dlm.backend_mask(torch.ones(1, 4, 4, dtype=torch.bool)),
                       position_ids=torch.arange(4)[None]).logits[0, 3]
    logp = candidate_logits(dlm, logits.float()).log_softmax(-1)
    best, other = int(logp.argmax()), int(logp.argsort()[-2])
    (lp_best, g_best), (lp_other, g_other) = lm._loglikelihood_tokens(
        [(None, context, [best]), (None, context, [other])], disable_tqdm=True)
    assert g_best and not g_other
    assert lp_best == pytest.approx(logp[best].item(), abs=1e-5)
    assert lp_other == pytest.approx(logp[other].item(), abs=1e-5)


def test_autoregressive_mode_is_plain_causal_loglikelihood(dirs):
    lm = EdlmLM(pretrained=str(dirs["ar"]), device="cpu", autoregressive=True)
    x = [5, 6, 7, 8, 9, 10, 11]
    logits = lm.dlm.model(input_ids=torch.tensor([x])).logits[0].float()
    logp = candidate_logits(lm.dlm, logits).log_softmax(-1)  # padded vocab rows excluded, as in decoding
    expected = sum(logp[p - 1, x[p]].item() for p in range(3, len(x)))
    [(lp, _)] = lm._loglikelihood_tokens([(None, x[:3], x[3:])], disable_tqdm=True)
    assert lp == pytest.approx(expected, abs=1e-4)


def test_elbo_is_exact_for_one_token_and_reproducible(dirs):
    ltr = EdlmLM(pretrained=str(dirs["dlm"]), device="cpu")
    elbo = EdlmLM(pretrained=str(dirs["dlm"]), device="cpu", estimator="elbo", mc_samples=3)
    one = [(None, [5, 6, 7, 8, 9], [10])]
    assert elbo._loglikelihood_tokens(one, True)[0][0] == pytest.approx(
        ltr._loglikelihood_tokens(one, True)[0][0], abs=1e-4)
    many = [(None, [5, 6, 7], [10, 11, 12, 13, 14])]
    a, b = elbo._loglikelihood_tokens(many, True), elbo._loglikelihood_tokens(many, True)
    assert a == b and a[0][0] < 0


@pytest.mark.parametrize("which,args", [("dlm", {"threshold": 0.5}), ("ar", {"autoregressive": True}),
                                        ("dlm_shift", {"verifier": "AR"})])
def test_simple_evaluate_on_local_tasks(dirs, which, args):
    args = {k: str(dirs["ar"]) if v == "AR" else v for k, v in args.items()}
    model_args = {"pretrained": str(dirs[which]), "batch_size": 2, "device": "cpu", **args}
    res = simple_evaluate(model="edlm", model_args=model_args,
                          tasks=["edlm_tiny_gen", "edlm_tiny_mc"], limit=3,
                          task_manager=TaskManager(include_path=str(dirs["tasks"]), include_defaults=False))
    assert res["n-samples"]["edlm_tiny_gen"]["effective"] == 3
    assert res["n-samples"]["edlm_tiny_mc"]["effective"] == 3
    assert "exact_match,none" in res["results"]["edlm_tiny_gen"]
    assert 0.0 <= res["results"]["edlm_tiny_mc"]["acc,none"] <= 1.0
    for s in res["samples"]["edlm_tiny_gen"]:
        text = s["resps"][0][0]
        assert "\n" not in text and len(text) <= 6  # `until` and max_gen_toks (one char per token)
    for s in res["samples"]["edlm_tiny_mc"]:  # loglikelihood requests: (logprob, is_greedy) per choice
        assert len(s["resps"]) == 3 and all(r[0][0] < 0 for r in s["resps"])
    assert res["config"]["edlm"]["generation"]["model_calls"] > 0


def test_eval_cli_writes_json(dirs, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", str(dirs["dlm"]), "--tasks", "edlm_tiny_mc,edlm_tiny_gen", "--limit", "2",
               "--include-path", str(dirs["tasks"]), "--estimator", "elbo", "--mc-samples", "2",
               "--block-size", "2", "--threshold", "0.7", "--strategy", "threshold", "--max-gen-toks", "4",
               "--batch-size", "2", "--num-fewshot", "0", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "edlm_tiny_mc" in printed and "TPF" in printed
    data = json.loads(out.read_text())
    assert data["n-samples"]["edlm_tiny_mc"]["effective"] == 2
    settings = data["config"]["edlm"]
    assert (settings["estimator"], settings["block_size"], settings["threshold"]) == ("elbo", 2, 0.7)


def test_eval_cli_user_errors(dirs, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["eval", str(dirs["dlm"]), "--tasks", "edlm_tiny_mc", "--estimator", "elbo", "--ar"]) == 2
    assert main(["eval", str(dirs["dlm"]), "--tasks", "edlm_tiny_mc", "--include-path",
                 str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_eval_cli_unknown_task(dirs, capsys):
    assert main(["eval", str(dirs["dlm"]), "--tasks", "edlm_no_such_task", "--include-path", str(dirs["tasks"])]) == 2
    assert "unknown task(s): edlm_no_such_task" in capsys.readouterr().err


def test_verified_generation_is_the_parents_greedy_text(dirs):
    from lm_eval.api.instance import Instance

    lm = EdlmLM(pretrained=str(dirs["dlm_shift"]), verifier=str(dirs["ar"]), device="cpu")
    ar = EdlmLM(pretrained=str(dirs["ar"]), autoregressive=True, device="cpu")
    reqs = [Instance("generate_until", {}, (q, {"until": ["\n"], "max_gen_toks": 6}), i)
            for i, q in enumerate(["1+2=", "Colour 3:"])]
    assert lm.generate_until(reqs, disable_tqdm=True) == ar.generate_until(reqs, disable_tqdm=True)



def test_verified_generation_refuses_options_it_would_ignore(dirs):
    """The two-model mode decodes the parent greedily: a threshold there is refused, as in the CLI
    and the server (edlm.decode.options.resolve_parent_verified), not silently dropped."""
    from edlm.decode.options import DecodeOptionError

    with pytest.raises(DecodeOptionError, match="threshold"):
        EdlmLM(pretrained=str(dirs["dlm_shift"]), verifier=str(dirs["ar"]), threshold=0.5, device="cpu")


REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_reasoning_task_runs_as_the_readme_shows(tmp_path, capsys, monkeypatch):
    """`edlm eval models/dlm --tasks edlm_reasoning --include-path tasks/`: the task ships in tasks/,
    its problems are edlm.recipes.reasoning's held-out split, scored on the final answer."""
    from edlm.recipes import reasoning

    monkeypatch.chdir(REPO)
    out = tmp_path / "res.json"
    assert main(["eval", "models/dlm", "--tasks", "edlm_reasoning", "--include-path", "tasks/", "--limit", "2",
                 "--out", str(out)]) == 0
    assert "edlm_reasoning" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n-samples"]["edlm_reasoning"]["effective"] == 2
    assert res["results"]["edlm_reasoning"]["exact_match,none"] == 1.0  # the demo dLM solves both (93% overall)
    spec = importlib.util.spec_from_file_location("edlm_reasoning_utils", REPO / "tasks/edlm_reasoning/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.held_out_problems()["test"]
    first = reasoning.test_problems(1)[0]
    assert len(docs) == reasoning.TEST_SIZE and docs[0]["prompt"] == first.prompt
    assert utils.process_results(docs[0], [first.response]) == {"exact_match": 1.0}
    assert utils.process_results(docs[0], [f" #### {first.answer + 1}"]) == {"exact_match": 0.0}
