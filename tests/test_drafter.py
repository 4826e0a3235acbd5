"""The drafting adapter: LoRA on noisy positions only, so the clean stream stays the parent."""

import copy

import pytest
import torch

from edlm import DiffusionLM
from edlm.cli import main
from edlm.config import DiffusionConfig
from edlm.drafter import WEIGHTS_NAME, DrafterConfig, GatedLoRA, gate_of
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]
DRAFTER_EVERYWHERE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the demo's


def parent(arch="llama"):
    """An AR parent whose vocabulary is its tokenizer's, so HF's argmax never lands on a padded row."""
    tok = make_tiny_tokenizer()
    return make_tiny_causal_lm(arch, vocab_size=len(tok), dtype=torch.float64), tok


def with_drafter(model, tok, rank=4, targets=("o_proj",), trained=True, block_size=4):
    dlm = convert_model(copy.deepcopy(model), tok, block_size=block_size,
                        drafter=DrafterConfig(rank=rank, alpha=2.0 * rank, targets=list(targets)))
    if trained:  # stand-in for a trained adapter: drafts that differ from the parent's own
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in dlm.model.modules():
                if isinstance(mod, GatedLoRA):
                    mod.lora_b.weight.copy_(torch.randn(mod.lora_b.weight.shape, generator=g, dtype=torch.float64))
    return dlm


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("trained", [False, True])
def test_verified_with_a_drafter_is_the_parents_greedy_text(arch, trained):
    """Whatever the adapter holds, `verified` returns HF generate's text of the original parent,
    alone and batched, at >= 1 token per forward."""
    model, tok = parent(arch)
    dlm = with_drafter(model, tok, targets=("o_proj", "v_proj"), trained=trained)
    assert dlm.config.decoding["strategy"] == "verified" and dlm.config.shift and dlm.config.causal_clean
    batched = dlm.generate(PROMPTS, max_new_tokens=12)
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(model, tok, prompt, 12)
        assert batched.token_ids[i] == want
        assert dlm.generate(prompt, max_new_tokens=12).token_ids[0] == want
        assert batched.stats[i].tpf >= 1.0


def test_the_gate_opens_on_noisy_positions_only():
    """With no noisy token the adapted model is the parent bit for bit; noisy queries change, and
    clean queries of the same forward do not (the adapter never reaches them)."""
    model, tok = parent()
    dlm = with_drafter(model, tok)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    vocab = model.config.vocab_size  # the dLM has one more row: the mask token
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(dlm.model(input_ids=ids).logits[..., :vocab], ref)
        noisy = torch.zeros_like(ids, dtype=torch.bool)
        noisy[:, -3:] = True
        with gate_of(dlm.model).open_on(noisy):
            got = dlm.model(input_ids=ids).logits[..., :vocab]  # causal: clean positions come before noisy ones
    assert torch.equal(got[:, :-3], ref[:, :-3]) and not torch.allclose(got[:, -3:], ref[:, -3:])


def test_a_drafter_saves_beside_the_parents_weights_and_loads(tmp_path):
    model, tok = parent()
    dlm = with_drafter(model, tok, targets=("o_proj",))
    dlm.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / WEIGHTS_NAME).is_file()
    plain = DiffusionLM.from_pretrained(tmp_path / "d", autoregressive=True, dtype=torch.float64)
    assert gate_of(plain.model) is None  # as an AR checkpoint it is the parent, weights under their own names
    for name, weight in model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[name][: weight.shape[0]], weight), name
    loaded = DiffusionLM.from_pretrained(tmp_path / "d", dtype=torch.float64)
    assert loaded.config.drafter == {"rank": 4, "alpha": 8.0, "targets": ["o_proj"]}
    a, b = dlm.generate(PROMPTS, max_new_tokens=10), loaded.generate(PROMPTS, max_new_tokens=10)
    assert a.token_ids == b.token_ids and [s.model_calls for s in a.stats] == [s.model_calls for s in b.stats]
    assert loaded.merged() is loaded  # nothing to merge: the adapter lives beside the weights
    from edlm.serve.export import export

    with pytest.raises(EdlmError, match="drafts with an adapter"):
        export(tmp_path / "d", tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "o_proj"), DRAFTER_EVERYWHERE])
def test_a_fused_adapter_computes_the_same_layers(targets, tmp_path):
    """edlm.fusion (DiffusionLM.compile's) on a drafter: each adapted layer's A is stacked with its W
    (and q/k/v, gate/up with their siblings' where all are adapted): the logits are the plain path's
    (qwen2: biased q/k/v), texts stay HF generate's, in-place writes to A and B reach the fused
    GEMM, autograd takes the plain path, and the model still saves."""
    from edlm.fusion import fuse

    model, tok = parent("qwen2")
    dlm = with_drafter(model, tok, targets=targets)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    noisy = torch.zeros_like(ids, dtype=torch.bool)
    noisy[:, -3:] = True

    def logits(gate=noisy):
        with torch.no_grad(), gate_of(dlm.model).open_on(gate):
            return dlm.model(input_ids=ids).logits

    before, parents = logits(), logits(None)
    fuse(dlm.model)
    layers = [m for m in dlm.model.modules() if isinstance(m, GatedLoRA)]

    def storage(t):
        return t.untyped_storage().data_ptr()

    assert all(storage(m.base.weight) == storage(m.lora_a.weight) == storage(m.fused[0].weight) for m in layers)
    q, k = dlm.model.model.layers[0].self_attn.q_proj, dlm.model.model.layers[0].self_attn.k_proj
    assert (q.fused[0] is getattr(k, "fused", (None,))[0]) == ("k_proj" in targets)  # q/k/v stack only when all are adapted
    assert torch.allclose(logits(), before, atol=1e-12, rtol=0) and torch.equal(logits(None), parents)
    for weight in (layers[1].lora_a.weight, layers[1].lora_b.weight):
        with torch.no_grad():
            weight.mul_(3.0)  # an in-place write (an optimizer step, load_state_dict)
        assert not torch.allclose(logits(), before)
        with torch.no_grad():
            weight.div_(3.0)
    with gate_of(dlm.model).open_on(noisy):
        dlm.model(input_ids=ids).logits.sum().backward()
    assert layers[0].lora_a.weight.grad is not None and layers[0].lora_a.weight.grad.abs().sum() > 0
    for prompt in PROMPTS:
        assert dlm.generate(prompt, max_new_tokens=12).token_ids[0] == hf_greedy(model, tok, prompt, 12)
    dlm.save_pretrained(tmp_path / "d")
    loaded = DiffusionLM.from_pretrained(tmp_path / "d", dtype=torch.float64)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]  # ids: a tiny qwen2 tokenizer reloads as another class
    assert loaded.generate(prompts, max_new_tokens=10).token_ids == dlm.generate(prompts, max_new_tokens=10).token_ids


def test_convert_cli_adds_a_drafter(tiny_ar_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "d"), "--block-size", "4", "--drafter", "lora:2"]) == 0
    dlm = DiffusionLM.from_pretrained(tmp_path / "d")
    assert dlm.config.drafter["rank"] == 2 and dlm.config.shift and dlm.config.causal_clean
    assert sum(isinstance(m, GatedLoRA) for m in dlm.model.modules()) == dlm.model.config.num_hidden_layers
    capsys.readouterr()
    for bad in ("lora", "lora:0", "lora:x", "adapter:4", "lora:4:"):
        assert main(["convert", str(tiny_ar_dir), str(tmp_path / "e"), "--drafter", bad]) == 2
        assert "--drafter takes" in capsys.readouterr().err or bad == "lora:4:"
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "f"), "--drafter", "lora:2:nope"]) == 2
    assert "no linear layer named nope" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_training_a_drafter_moves_only_the_adapter_and_the_mask_row(tmp_path):
    """`--train drafter`: the loss falls, the adapter and the mask token's embedding row change,
    every weight of the parent stays bit-identical, and verified is still the parent's text."""
    import json

    from edlm.train import TrainConfig, train

    model, tok = parent()
    dlm = with_drafter(model, tok, trained=False)
    dlm.save_pretrained(tmp_path / "d")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "t.txt").write_text(text + "\n\n" + text[::-1])
    cfg = TrainConfig(model=str(tmp_path / "d"), data=[str(tmp_path / "t.txt")], out=str(tmp_path / "run"),
                      train="drafter", masking="full", seq_len=32, batch_size=4, steps=40, lr=1e-2, min_lr=1e-3,
                      warmup_steps=2, save_every=1000, progress=False, log_every=5)
    train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    trained = DiffusionLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float64)
    mask_id = trained.config.mask_token_id
    for name, weight in dlm.model.state_dict().items():
        now = trained.model.state_dict()[name]
        if ".lora_b." in name:
            assert not torch.equal(now, weight), name
        elif name.endswith("embed_tokens.weight"):
            changed = (now != weight).any(-1).nonzero().flatten().tolist()
            assert changed == [mask_id]
        elif ".lora_a." not in name:
            assert torch.equal(now, weight), name
    for prompt in PROMPTS:
        assert trained.generate(prompt, max_new_tokens=10).token_ids[0] == hf_greedy(model, tok, prompt, 10)


def test_train_drafter_needs_a_drafter(tiny_ar_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    args = ["train", str(tiny_ar_dir), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r"),
            "--train", "drafter", "--steps", "2", "--seq-len", "32", "--block-size", "4"]
    assert main(args) == 2
    assert "convert BASE OUT --drafter" in capsys.readouterr().err
    assert main([*args, "--lora-rank", "4"]) == 2
    assert "drop --lora-rank" in capsys.readouterr().err


def test_a_trained_adapter_file_rebuilds_the_drafter_on_its_parent(tiny_ar_dir, tmp_path, capsys):
    """drafter.safetensors alone (settings, mask row and adapter) on a freshly converted parent
    decodes exactly as the checkpoint it came from: same tokens, same forwards, same mask row."""
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "d"), "--block-size", "4", "--drafter", "lora:2:o_proj,v_proj"]) == 0
    dlm = DiffusionLM.from_pretrained(tmp_path / "d")
    g = torch.Generator().manual_seed(3)
    mask = dlm.config.mask_token_id
    with torch.no_grad():  # stand-in for training: the adapter and the mask token's row move
        for mod in dlm.model.modules():
            if isinstance(mod, GatedLoRA):
                mod.lora_b.weight.copy_(torch.randn(mod.lora_b.weight.shape, generator=g))
        dlm.model.get_input_embeddings().weight[mask] = torch.randn(dlm.model.config.hidden_size, generator=g)
    dlm.save_pretrained(tmp_path / "trained")
    adapter = tmp_path / "trained" / WEIGHTS_NAME
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "again"), "--block-size", "4", "--drafter", str(adapter)]) == 0
    again = DiffusionLM.from_pretrained(tmp_path / "again")
    assert again.config.drafter == {"rank": 2, "alpha": 4.0, "targets": ["o_proj", "v_proj"]}
    assert torch.equal(again.model.get_input_embeddings().weight[mask], dlm.model.get_input_embeddings().weight[mask])
    a, b = dlm.generate(PROMPTS, max_new_tokens=10), again.generate(PROMPTS, max_new_tokens=10)
    assert a.token_ids == b.token_ids and [s.model_calls for s in a.stats] == [s.model_calls for s in b.stats]
    untrained = DiffusionLM.from_pretrained(tmp_path / "d").generate(PROMPTS, max_new_tokens=10)
    assert [s.model_calls for s in untrained.stats] != [s.model_calls for s in a.stats]  # the adapter mattered
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(adapter)), str(adapter))  # as adapters were saved before they carried settings
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "old"), "--block-size", "4", "--drafter",
                 str(tmp_path / "trained")]) == 0  # the settings then come from the checkpoint's config
    old = DiffusionLM.from_pretrained(tmp_path / "old").generate(PROMPTS, max_new_tokens=10)
    assert old.token_ids == a.token_ids and [s.model_calls for s in old.stats] == [s.model_calls for s in a.stats]
    capsys.readouterr()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "x"), "--drafter", str(tmp_path / "junk.safetensors")]) == 2
    assert "is not a drafting adapter saved by edlm" in capsys.readouterr().err
    other = make_tiny_causal_lm("llama", hidden_size=128)  # another parent: shapes differ
    other.save_pretrained(tmp_path / "other")
    make_tiny_tokenizer().save_pretrained(tmp_path / "other")
    assert main(["convert", str(tmp_path / "other"), str(tmp_path / "y"), "--drafter", str(tmp_path / "trained")]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("some_blocks", [False, True])
def test_training_over_a_frozen_parent_computes_the_clean_stream_apart(shift, some_blocks):
    """With the parent frozen (--train drafter) forward_noisy runs the clean half without a graph
    into a cache, then the noisy half over it: the same logits and adapter gradients as the one
    [noisy ; clean] forward, in whole or with only some blocks fed (`active`)."""
    model, tok = parent()
    dlm = with_drafter(model, tok, targets=("o_proj", "v_proj", "up_proj"), block_size=4)
    dlm.config.shift = shift
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(3, len(tok), (2, 12), generator=g)
    x_t = torch.where(torch.rand(x_0.shape, generator=g) < 0.5, dlm.config.mask_token_id, x_0)
    active = torch.tensor([[True, False, True], [False, True, True]]) if some_blocks else None
    gate, adapter = gate_of(dlm.model), [p for n, p in dlm.model.named_parameters() if ".lora_" in n]
    got = {}
    for frozen in (False, True):
        gate.parent_frozen = frozen
        logits = dlm.forward_noisy(x_t, x_0, active=active)
        grads = torch.autograd.grad(logits.pow(2).mean(), adapter)
        got[frozen] = (logits, grads)
    torch.testing.assert_close(got[True][0], got[False][0])
    for a, b in zip(got[True][1], got[False][1], strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in got[True][1])


def test_bf16_texts_are_hf_generates_bit_for_bit_at_batch_1():
    """In bf16 on a CPU a verification forward's clean rows get HF generate's own bits only when
    attended one at a time (edlm.decode.rowwise): `verified` with a drafter and the two-model mode
    then return HF generate's text of the parent, where one masked call moved 5 of these 12."""
    tok = make_tiny_tokenizer()
    for seed in range(4):
        model = make_tiny_causal_lm("llama", vocab_size=len(tok), dtype=torch.bfloat16, seed=seed, hidden_size=256,
                                    intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2)
        dlm = convert_model(copy.deepcopy(model), tok, block_size=4,
                            drafter=DrafterConfig(rank=4, alpha=8.0, targets=["o_proj"]))
        ar = DiffusionLM(model, tok, DiffusionConfig.autoregressive(base_model="tiny"))
        for prompt in ["The cat sat on the mat and", "Hello, world! This is", "Once upon a time there was a"]:
            want = hf_greedy(model, tok, prompt, 40)
            assert dlm.generate(prompt, max_new_tokens=40).token_ids[0] == want
            assert dlm.generate(prompt, max_new_tokens=40, verifier=ar).token_ids[0] == want


def test_the_drafter_recipe_trains_an_adapter_on_the_parents_answers_and_resumes(tmp_path, monkeypatch):
    """`make drafter-model` in miniature on the shipped parent: its answers, a fresh adapter, two
    steps; the parent's weights stay bit-identical and the adapter moves; a finished stage is not
    redone; --init goes on training a trained adapter; --data, --block-size and --window train a wider
    drafter on an earlier schedule's answers without answering again."""
    from pathlib import Path

    from safetensors.torch import load_file

    from edlm.recipes import drafter_model

    parent = Path(__file__).resolve().parents[1] / "models" / "ar"
    monkeypatch.chdir(tmp_path)  # the recipe's data split goes under ./runs

    def run(work, out, *extra):
        drafter_model.main(["--parent", str(parent), "--work", work, "--out", out, "--steps", "2", "--answers", "4",
                            *extra])
        return load_file(str(tmp_path / out / WEIGHTS_NAME))

    adapter = run("w", "out")
    answers = (tmp_path / "w" / "self.jsonl").read_text().splitlines()
    assert len(answers) == 4 and all("response" in row for row in answers)
    dlm = DiffusionLM.from_pretrained(tmp_path / "out")
    assert dlm.config.decoding == drafter_model.DECODING and gate_of(dlm.inner_model) is not None
    base, mine = load_file(str(parent / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(base[k], mine[k]) for k in base if k != "model.embed_tokens.weight")
    assert any(k.endswith("lora_b.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # trained from zero
    with monkeypatch.context() as patched:
        patched.setattr("edlm.recipes.distill.distill", None)  # the answers are not decoded again
        resumed = run("w", "out")
    assert all(torch.equal(v, resumed[k]) for k, v in adapter.items())  # done: resumed at its end
    again = run("w2", "out2", "--init", str(tmp_path / "out"))
    assert not all(torch.equal(adapter[k], again[k]) for k in adapter)  # went on training the given adapter
    with monkeypatch.context() as patched:  # --data: an earlier schedule's answers, nothing decoded; --block-size
        patched.setattr("edlm.recipes.distill.distill", None)
        wide = run("w3", "out3", "--init", str(tmp_path / "out"), "--data", "w/self.jsonl", "--block-size", "16",
                   "--window", "2")
    wider = DiffusionLM.from_pretrained(tmp_path / "out3")
    assert wider.config.block_size == 16 and wider.config.decoding == {**drafter_model.DECODING, "blocks": 2}
    assert not (tmp_path / "w3" / "self.jsonl").exists() and not all(torch.equal(adapter[k], wide[k]) for k in adapter)


def test_a_recipe_ends_a_user_mistake_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m edlm.recipes.drafter_model --data missing.jsonl`: one line and exit 2, not a traceback."""
    import sys
    from pathlib import Path

    from edlm.recipes import drafter_model, run_recipe

    parent = Path(__file__).resolve().parents[1] / "models" / "ar"
    monkeypatch.setattr(sys, "argv", [drafter_model.__file__])
    with pytest.raises(SystemExit) as exit_:
        run_recipe(lambda: drafter_model.main(["--parent", str(parent), "--work", str(tmp_path / "w"),
                                               "--data", str(tmp_path / "missing.jsonl"), "--steps", "1"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"drafter_model: error: data file not found: {tmp_path}/missing.jsonl"
