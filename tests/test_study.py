import json

import torch

from edlm import DiffusionLM
from edlm.cli import main
from edlm.decode.kv import candidate_logits
from edlm.recipes.bench import Example
from edlm.recipes.study import answer_nll, run_study, verdict


def test_attention_study_runs_and_reports(tiny_ar_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question: {i}+1?\nAnswer:", "response": f" {i + 1}"})
                              for i in range(200)))
    res = run_study(str(tiny_ar_dir), [str(data)], str(tmp_path / "s"), studies=("attention", "masking"), steps=2,
                    limit=2, block_size=4, seq_len=32, batch_size=2, max_new_tokens=4, progress=False)
    rows = res["attention"]
    assert len(rows) == 1 + 4 * 2 and {r["threshold"] for r in rows} == {None, 1.0, 0.7}
    assert rows[0]["variant"] == "AR parent"
    # "position hl=0.1" trains exactly what "block, clean context, no shift" trains: one run, same scores
    runs = sorted(d.name for d in (tmp_path / "s" / "runs").iterdir())
    assert len(runs) == 4 + 4 and "default" in runs and "attention=noisy" in runs
    same = [[r for r in res[s] if r["variant"] == v] for s, v in
            (("attention", "block, clean context, no shift"), ("masking", "position hl=0.1"))]
    assert [(r["accuracy"], r["tpf"]) for r in same[0]] == [(r["accuracy"], r["tpf"]) for r in same[1]]
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Table 1" in report and ("agrees" in report or "DISAGREES" in report)
    assert "By answer NLL/token" in report and all(r["answer_nll"] > 0 for r in rows)
    assert (tmp_path / "s" / "attention.png").stat().st_size > 0


def test_verdict_reads_the_direction():
    rows = [{"variant": v, "threshold": 1.0, "accuracy": a} for v, a in [
        ("bidirectional", 0.1), ("block, noisy context", 0.2), ("block, clean context, shift", 0.3),
        ("block, clean context, no shift", 0.4)]]
    assert verdict("attention", rows).count("agrees") == 2
    rows[0]["accuracy"] = 0.9
    assert "DISAGREES" in verdict("attention", rows)
    # with a shift base, noisy and bidirectional are shift models: compared with clean + shift
    rows[0]["accuracy"] = 0.1
    rows[2]["accuracy"] = 0.15  # clean + shift below noisy context
    assert verdict("attention", rows, shift=True).startswith("clean >= noisy >= bidirectional: DISAGREES")
    assert verdict("attention", rows, shift=False).startswith("clean >= noisy >= bidirectional: agrees")


def test_unknown_study_is_a_one_line_error(tiny_ar_dir, tmp_path, capsys):
    assert main(["study", "--base", str(tiny_ar_dir), "--data", "x.jsonl", "--studies", "nope"]) == 2
    assert "unknown study" in capsys.readouterr().err
    # checked before any evaluation or training starts
    assert main(["study", "--base", str(tiny_ar_dir), "--data", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "s")]) == 2
    assert "data file not found" in capsys.readouterr().err and not (tmp_path / "s").exists()  # as edlm train says


def test_answer_nll_at_block_size_1_is_the_ar_loss(tiny_ar_dir):
    """The study's NLL column for the AR parent must equal plain next-token cross-entropy over the
    tokens the decoder may emit (candidate_logits), computed here by one causal forward."""
    ar = DiffusionLM.from_pretrained(tiny_ar_dir, autoregressive=True)
    examples = [Example("Question: 3+4?\nAnswer:", " 7"), Example("Question: 12+30?\nAnswer:", " 42 done")]
    tok, total, n = ar.tokenizer, 0.0, 0
    for e in examples:
        prompt = tok(e.prompt).input_ids
        answer = tok(e.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = ar.model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        logp = candidate_logits(ar, logits.float()).log_softmax(-1)
        total -= logp[torch.arange(len(answer)), torch.tensor(answer)].sum().item()
        n += len(answer)
    assert abs(answer_nll(ar, examples, 1) - total / n) < 1e-4


def test_parity_study_decodes_three_ways_and_reports_speed(tiny_ar_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question: {i}+1?\nAnswer:", "response": f" {i + 1}"})
                              for i in range(200)))
    res = run_study(str(tiny_ar_dir), [str(data)], str(tmp_path / "s"), studies=("parity",), steps=2, limit=2,
                    block_size=4, seq_len=32, batch_size=2, max_new_tokens=4, progress=False, shift=True)
    rows = res["parity"]
    assert len(rows) == 1 + 6 * 4
    assert {r["decode"] for r in rows} == {"AR", "threshold", "verified", "parent verifies"}
    assert all(r["speedup"] > 0 and r["tpf"] > 0 for r in rows)
    runs = {d.name for d in (tmp_path / "s" / "runs").iterdir()}
    assert {"ar_loss_weight=1.0-causal_clean=True-masking=full", "ar_loss_weight=1.0-block_size=16-causal_clean=True",
            "default", "causal_clean=True"} <= runs
    cfg = json.loads((tmp_path / "s" / "runs" / "causal_clean=True" / "model" / "config.json").read_text())
    assert cfg["edlm"]["causal_clean"] is True
    report = (tmp_path / "s" / "report.md").read_text()
    assert "TiDAR" in report and "AUP" in report and "the AR loss" in report
