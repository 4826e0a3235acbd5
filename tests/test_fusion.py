"""Sibling projections as one GEMM (edlm.fusion): the same layer outputs, weights and names."""

import copy

import pytest
import torch

from edlm import DiffusionLM, fusion
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "Once upon a time there"]


def tiny_dlm(arch):
    tok = make_tiny_tokenizer()
    model = make_tiny_causal_lm(arch, vocab_size=len(tok), dtype=torch.float64)
    return convert_model(model, tok, block_size=4)


class Calls:
    """Counts the fused GEMMs run and the sibling slices handed out."""

    def __init__(self, monkeypatch):
        self.runs = self.taken = 0
        run, take = fusion.FusedGroup.run, fusion.FusedGroup.take

        def counted_run(group, x):
            self.runs += 1
            return run(group, x)

        def counted_take(group, index, x):
            out = take(group, index, x)
            self.taken += out is not None
            return out

        monkeypatch.setattr(fusion.FusedGroup, "run", counted_run)
        monkeypatch.setattr(fusion.FusedGroup, "take", counted_take)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # GQA; biased q/k/v; q/k norms after the projection
def test_fused_siblings_compute_the_same_model(arch, monkeypatch, tmp_path):
    """q/k/v and gate/up become one GEMM each: the logits and texts stay, every sibling takes its
    slice of its lead's GEMM (none runs its own), the weights keep their names and values as views
    of the stacked weight (an in-place write reaches the fused GEMM), autograd takes the plain
    path, and the model saves and reloads as it was."""
    dlm = tiny_dlm(arch)
    model = dlm.model
    ids = torch.tensor([dlm.tokenizer("Once upon a time")["input_ids"]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    prompts = [dlm.tokenizer(p)["input_ids"] for p in PROMPTS]  # ids: a tiny qwen2 tokenizer reloads as another class
    texts = dlm.generate(prompts, max_new_tokens=10).token_ids
    layers = model.config.num_hidden_layers
    assert fusion.fuse(model) == 2 * layers and fusion.fuse(model) == 0  # once only
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.fused[0]
    assert attn.k_proj.weight.data_ptr() == group.weight[attn.q_proj.out_features:].data_ptr()
    calls = Calls(monkeypatch)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-12, rtol=0)
    assert (calls.runs, calls.taken) == (2 * layers, 3 * layers)  # q leads k, v; gate leads up
    assert dlm.generate(prompts, max_new_tokens=10).token_ids == texts
    with torch.no_grad():
        attn.k_proj.weight.mul_(3.0)  # an optimizer step, load_state_dict
        assert not torch.allclose(model(input_ids=ids).logits, before)
        attn.k_proj.weight.div_(3.0)
    model(input_ids=ids).logits.sum().backward()
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    dlm.save_pretrained(tmp_path / "d")
    loaded = DiffusionLM.from_pretrained(tmp_path / "d", dtype=torch.float64)
    assert loaded.generate(prompts, max_new_tokens=10).token_ids == texts


def test_a_sibling_given_another_input_runs_its_own_layer():
    """The slices are handed out for the lead's own input, once: a sibling called on another tensor,
    or called twice, computes its layer itself (same values), so an unusual caller stays correct."""
    model = tiny_dlm("qwen2").model
    fusion.fuse(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64).unbind(0)

    def own(layer, t):
        return torch.nn.functional.linear(t, layer.weight, layer.bias)

    with torch.no_grad():
        attn.q_proj(x)
        assert torch.allclose(attn.k_proj(y), own(attn.k_proj, y), atol=1e-12)  # another input
        assert torch.allclose(attn.v_proj(x), own(attn.v_proj, x), atol=1e-12)  # its slice
        assert torch.allclose(attn.v_proj(x), own(attn.v_proj, x), atol=1e-12)  # again: its own
        assert attn.q_proj.fused[0].input is x  # k's slice still waits
        assert torch.allclose(attn.k_proj(x), own(attn.k_proj, x), atol=1e-12)
        assert attn.q_proj.fused[0].input is None  # every slice gone: the input is not held


def test_no_group_is_made_of_unlike_layers():
    """Siblings must all be plain Linear (or all adapter layers) of one input width, device and dtype."""
    model = tiny_dlm("llama").model
    attn = model.model.layers[0].self_attn
    attn.k_proj.to(torch.float32)
    assert fusion.fuse(model) == 2 * model.config.num_hidden_layers - 1
    assert not hasattr(attn.q_proj, "fused") and type(attn.q_proj) is torch.nn.Linear


def test_a_model_cast_after_fusing_runs_its_own_layers():
    """The stacked weight no longer fits a cast model's inputs: each layer runs on its own, cast."""
    model = tiny_dlm("llama").model
    ref = copy.deepcopy(model).float()
    fusion.fuse(model)
    model.float()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_compile_fuses_unless_told_not_to():
    """DiffusionLM.compile fuses the model it compiles; fuse=False (bench/forward.py's baseline) does not."""
    plain, fused = tiny_dlm("llama").compile(fuse=False), tiny_dlm("llama").compile()
    assert type(plain.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(fused.model.model.layers[0].self_attn.q_proj) is fusion.FusedLinear
