import json

import pytest

from edlm.cli import main
from edlm.recipes.bench import run_bench
from edlm.train.convert import convert


def test_bench_one_run_all_settings(tiny_ar_dir, tmp_path, capsys):
    dlm_dir = tmp_path / "dlm"
    convert(tiny_ar_dir, dlm_dir, block_size=4)
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"Count {i}:", "answer": "x"}) for i in range(3)))
    rows = run_bench(str(dlm_dir), str(tiny_ar_dir), str(task), thresholds=(0.9, 0.3), batch_sizes=(1, 2),
                     limit=3, max_new_tokens=8, out=str(tmp_path / "out"))  # ends on a block: no slot is cut
    names = [(r["name"], r["batch_size"]) for r in rows]
    assert names == [("AR engine", 1), ("AR HF generate", 1), ("AR HF prompt-lookup", 1), ("dLM threshold 0.9", 1),
                     ("dLM threshold 0.3", 1), ("AR engine", 2), ("AR HF generate", 2), ("dLM threshold 0.9", 2),
                     ("dLM threshold 0.3", 2)]
    by = {n: r for n, r in zip(names, rows, strict=True)}
    # our AR engine and HF generate decode the same tokens: identical token counts
    assert by[("AR engine", 1)]["generated_tokens"] == by[("AR HF generate", 1)]["generated_tokens"]
    assert by[("AR engine", 1)]["tpf"] == 1.0
    assert by[("dLM threshold 0.3", 1)]["tpf"] >= by[("dLM threshold 0.9", 1)]["tpf"] >= 1.0
    for key in (("dLM threshold 0.9", 1), ("dLM threshold 0.3", 1)):  # every committed token is in the histogram
        hist = by[key]["commit_histogram"]
        assert sum(k * v for k, v in hist.items()) == by[key]["generated_tokens"] and min(hist) >= 1
    out = tmp_path / "out"
    assert "Tokens committed per model call" in (out / "results.md").read_text()
    for key in (("AR engine", 1), ("dLM threshold 0.9", 1), ("dLM threshold 0.9", 2)):  # forward vs the rest
        prof = by[key]["profile"]
        assert prof["forward_ms"] > 0 and prof["rest_ms"] > 0
        # model_calls counts each row's calls; a batched forward serves every row of the batch
        assert prof["forwards"] == by[key]["model_calls"] if key[1] == 1 else prof["forwards"] <= by[key]["model_calls"]
    assert (out / "pareto.png").stat().st_size > 0 and "dLM threshold 0.3" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 9
    # the device's forward cost by batch and tokens fed, for every batch size benched
    cost = {(c["batch_size"], c["tokens_per_row"]): c["ms"] for c in saved["forward_cost"]}
    assert set(cost) == {(b, t) for b in (1, 2) for t in (1, 8, 16, 32, 64)} and min(cost.values()) > 0
    assert "One forward by new tokens per row" in (out / "results.md").read_text()


def test_settings_are_timed_interleaved_chunk_by_chunk():
    from edlm.recipes.bench import Example, measure_together

    calls = []

    def runner(name):
        def run(prompts):
            calls.append((name, tuple(prompts)))
            return [p.upper() for p in prompts], 2 * len(prompts), len(prompts), {2: len(prompts)}
        return run

    examples = [Example(p, p.upper()) for p in "abcde"]
    rows = measure_together([("A", runner("A")), ("B", runner("B"))], examples, batch_size=2, repeats=2,
                            progress=False)
    warmup = [("A", ("a", "b")), ("B", ("a", "b"))]
    one_pass = [(n, c) for c in (("a", "b"), ("c", "d"), ("e",)) for n in "AB"]  # every setting per chunk
    assert calls == warmup + one_pass + one_pass
    for r in rows:  # accuracy and counts from the first pass only
        assert r["accuracy"] == 1.0 and r["generated_tokens"] == 10 and r["tpf"] == 2.0
        assert r["commit_histogram"] == {2: 5}


def test_bench_cli_errors(tiny_ar_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    assert main(["bench", str(tiny_ar_dir), "--base", str(tiny_ar_dir), "--task", str(bad)]) == 2
    assert "prompt" in capsys.readouterr().err
    assert main(["bench", str(tiny_ar_dir), "--base", str(tiny_ar_dir), "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_aup_on_a_hand_computed_curve():
    from math import exp

    from edlm.recipes.bench import aup

    # (TPF, accuracy %): the last two fall more than 5 points under the first and are dropped
    points = [(4.0, 80.0), (1.0, 90.0), (2.0, 88.0), (5.0, 70.0)]
    w90, w88 = exp(-3 * (1 - 90 / 92)), exp(-3 * (1 - 88 / 92))
    assert abs(aup(points, 92.0) - (1 * 90 + 0.5 * (2 - 1) * (88 * w88 + 90 * w90))) < 1e-9
    assert aup([(1.0, 92.0)], 92.0) == 92.0  # an AR model scores its accuracy
    assert aup([(1.0, 90.0), (3.0, 90.0)], 90.0) == 90 + 0.5 * 2 * 180  # W = 1 at y_max: the area


def test_bench_and_generate_load_models_in_the_dtype_asked(tiny_ar_dir, tmp_path, capsys):
    from edlm.train.convert import convert

    dlm_dir = tmp_path / "dlm"
    convert(tiny_ar_dir, dlm_dir, block_size=4)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "Count 1:", "answer": "x"}) + "\n")
    out = tmp_path / "out"
    assert main(["bench", str(dlm_dir), "--base", str(tiny_ar_dir), "--task", str(task), "--limit", "1",
                 "--max-new-tokens", "4", "--no-hf", "--thresholds", "0.9", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["dtype"] == "bfloat16" and all(r["generated_tokens"] > 0 for r in saved["rows"])
    capsys.readouterr()
    assert main(["generate", str(dlm_dir), "--prompt", "ab", "--max-new-tokens", "4", "--dtype", "bfloat16",
                 "--json"]) == 0
    assert 1 <= json.loads(capsys.readouterr().out)["generated_tokens"] <= 4
    with pytest.raises(SystemExit) as exc:  # argparse: one usage line and the error, exit 2
        main(["generate", str(dlm_dir), "--prompt", "ab", "--dtype", "float8"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
