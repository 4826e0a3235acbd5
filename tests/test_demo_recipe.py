"""`make models` stage 7 (edlm.recipes.demo_model.train_for_windows): its rounds answer, filter and
train in the order and with the recipes written down, and a rerun resumes without answering again."""

from pathlib import Path

from edlm.recipes import demo_model, distill, reasoning
from edlm.train import TrainConfig


def test_window_rounds_answer_filter_and_train_as_written(monkeypatch, tmp_path):
    answered, trained = [], []

    def fake_distill(dlm, prompts, out, answers=None, **kw):
        answered.append((Path(out).parent.name, len(prompts), answers))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("")

    def fake_run(model, out, steps, lr, min_lr, **kw):
        trained.append((Path(model).parent.name, out.name, kw["seed"], kw["masking"], kw.get("full_fraction", 0.0)))
        return out / "model"

    monkeypatch.setattr(distill, "distill", fake_distill)
    monkeypatch.setattr("edlm.model.DiffusionLM.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(demo_model, "WINDOW_ANSWERS", 3)
    final = demo_model.train_for_windows(Path("start/model"), tmp_path, demo_model.WINDOW_ROUNDS, fake_run)
    n_rounds = len(demo_model.WINDOW_ROUNDS)
    assert [a[0] for a in answered] == [f"window-data{r}" for r in range(1, n_rounds + 1)]
    for (start, right_only, _), (_, n, answers) in zip(demo_model.WINDOW_ROUNDS, answered, strict=True):
        assert n == 3
        if right_only:  # the reference answers of exactly these prompts, for the filter
            want = {p.prompt: str(p.answer) for p in reasoning.train_problems(3, start=start)}
            assert answers == want
        else:
            assert answers is None
    recipes = [r for _, _, rs in demo_model.WINDOW_ROUNDS for r in rs]
    assert [t[3] for t in trained] == [demo_model.WINDOW_RECIPES[r]["masking"] for r in recipes]
    assert [t[2] for t in trained] == list(range(7, 7 + len(recipes)))  # a new data order each schedule
    assert [t[0] for t in trained[1:]] == [t[1] for t in trained[:-1]]  # each schedule starts from the last
    assert final == tmp_path / trained[-1][1] / "model"
    assert trained[-1][3:] == ("position", 0.5)  # the shipped dLM's last schedule: mixed masks
    answered.clear()
    demo_model.train_for_windows(Path("start/model"), tmp_path, demo_model.WINDOW_ROUNDS, fake_run)
    assert answered == []  # answered rounds are done: a rerun only resumes the training


def test_every_window_recipe_is_a_valid_train_config():
    for recipe in demo_model.WINDOW_RECIPES.values():
        TrainConfig(model="m", data=[__file__], out="o", **recipe).validate()
