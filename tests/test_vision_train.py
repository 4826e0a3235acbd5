"""edlm train with images (a VLM's dLM, and its AR parent): both tiny VLM families learn from a tiny
image set; the noisy stream gets the clean stream's (3-D) position ids and the image features;
image tokens are never masked; the vision tower stays bit-identical under diffusion training and
learns under --objective ar; the training forward equals a hand-built one; resume is exact; bad
image data is one line naming its file and row."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import losses, weights
from test_train_errors import FAST, snapshot

from edlm import DiffusionLM
from edlm.cli import main
from edlm.masks import clean_context_mask
from edlm.model import load_causal_lm
from edlm.testing import VLM_ARCHITECTURES, make_tiny_vlm, save_tiny_vlm
from edlm.train import TrainConfig, train
from edlm.train.convert import convert_model
from edlm.train.data import build_dataset, end_blocks_with_eos
from edlm.train.noise import NoiseSettings
from edlm.train.objective import blocks_with_loss, causal_lm_loss, diffusion_loss, row_generators
from edlm.vision import image_token_id, training_vision, vision_modules

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Solid-colour images (56x56, 84x56) under img/, SFT and chat rows naming them relatively,
    and a tiny AR VLM checkpoint dir of each family."""
    d = tmp_path_factory.mktemp("vision")
    (d / "img").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(d / "img" / f"{name}.png")
        Image.new("RGB", (84, 56), rgb).save(d / "img" / f"{name}-wide.png")
    sft = [{"images": [f"img/{n}.png"], "prompt": "colour?", "response": f" {n}"} for n in COLOURS]
    chat = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{n}-wide.png"},
                                                       {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": f" {n}"}]} for n in COLOURS]
    write(d / "sft.jsonl", sft * 6)
    write(d / "chat.jsonl", chat * 2)
    write(d / "bare.jsonl", [{"images": [str(d / "img" / f"{n}.png")], "prompt": "", "response": f" {n}!"}
                             for n in COLOURS])
    for arch in VLM_ARCHITECTURES:
        save_tiny_vlm(d / arch, arch)
    return d


def write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(world, out, arch, **kw):
    base = dict(model=str(world / arch), data=[str(world / "sft.jsonl"), str(world / "chat.jsonl")], out=str(out),
                block_size=4, seq_len=40, batch_size=4, steps=24, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                save_every=1000, progress=False, log_every=1)
    base.update(kw)
    return train(TrainConfig(**base))


def loaded(model_dir: Path) -> tuple[dict, torch.Tensor]:
    """A saved model's vision tower + projector state and one weight of its language model."""
    model, _ = load_causal_lm(model_dir, "cpu", torch.float32)
    tower = {f"{i}.{k}": v for i, m in enumerate(vision_modules(model)) for k, v in m.state_dict().items()}
    return tower, model.get_decoder().layers[0].mlp.up_proj.weight.detach()


def tiny_dlm(arch, dtype=torch.float32):
    model, tok, processor = make_tiny_vlm(arch, dtype=dtype)
    model.edlm_image_processor = processor
    return convert_model(model, tok, block_size=4)


# ---------------------------------------------------------------- training learns
@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_diffusion_training_with_images_learns_and_keeps_the_parents_vision(world, tmp_path, arch):
    final = run(world, tmp_path / "run", arch)
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < 0.7 * sum(ls[:5]) / 5, ls
    (trained, lm), (parent, parent_lm) = loaded(final), loaded(world / arch)
    assert sorted(trained) == sorted(parent) and len(trained) > 10
    assert all(torch.equal(trained[k], parent[k]) for k in trained)  # bit-identical: frozen, as converted
    assert not torch.equal(lm, parent_lm)  # while the language model learned
    dlm = DiffusionLM.from_pretrained(final)
    assert dlm.image_processor is not None
    out = dlm.generate("colour?", images=[world / "img" / "red.png"], max_new_tokens=4)
    assert out.stats[0].generated_tokens <= 4


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_ar_objective_with_images_trains_the_vision_tower(world, tmp_path, arch):
    final = run(world, tmp_path / "ar", arch, objective="ar", steps=16)
    ls = losses(tmp_path / "ar")
    assert sum(ls[-4:]) / 4 < 0.7 * sum(ls[:4]) / 4, ls
    assert "edlm" not in json.loads((final / "config.json").read_text())  # still a plain AR VLM
    (trained, _), (parent, _) = loaded(final), loaded(world / arch)
    assert sum(not torch.equal(trained[k], parent[k]) for k in trained) > len(trained) // 2  # it learns to see


def test_train_vision_learns_only_the_tower_and_projector(world, tmp_path):
    """--train vision (LLaVA's alignment stage): the language model stays bit-identical, loss falls."""
    final = run(world, tmp_path / "align", "llava", objective="ar", train="vision", steps=16)
    ls = losses(tmp_path / "align")
    assert sum(ls[-4:]) < 0.99 * sum(ls[:4]), ls  # a random frozen LM is hard to steer: it still falls
    (trained, _), (parent, _) = loaded(final), loaded(world / "llava")
    assert sum(not torch.equal(trained[k], parent[k]) for k in trained) > len(trained) // 2
    after, _ = load_causal_lm(final, "cpu", torch.float32)
    before, _ = load_causal_lm(world / "llava", "cpu", torch.float32)
    lm_after, lm_before = after.get_decoder().state_dict(), before.get_decoder().state_dict()
    assert all(torch.equal(lm_after[k], lm_before[k]) for k in lm_before)
    assert torch.equal(after.lm_head.weight, before.lm_head.weight)


# ---------------------------------------------------------------- the forward
def batch_of(dlm, world, name="bare.jsonl", seq_len=16):
    ds = build_dataset([str(world / name)], dlm.tokenizer, seq_len, model=dlm.inner_model)
    batch = ds[:4]
    ids, maskable = end_blocks_with_eos(batch["input_ids"], batch["maskable"], batch["length"], 4,
                                        dlm.tokenizer.eos_token_id)
    return ids, maskable, batch["images"], batch["length"]


def captured(dlm):
    """Records the inputs_embeds and position_ids the language model itself receives."""
    seen = []
    decoder = dlm.inner_model.get_decoder()
    decoder.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["inputs_embeds"], kw["position_ids"])),
                                      with_kwargs=True)
    return seen


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_noisy_stream_gets_the_clean_streams_position_ids_and_image_features(world, arch):
    dlm = tiny_dlm(arch)
    ids, maskable, images, _ = batch_of(dlm, world)
    rows = training_vision(dlm.inner_model, dlm.image_processor, ids, images)
    is_image = ids == image_token_id(dlm.inner_model.config)
    x_t = torch.where(maskable, dlm.config.mask_token_id, ids)  # the response all masked
    active = blocks_with_loss(maskable & (torch.arange(16) < 12), 4)  # blocks 1 and 2 of every row
    assert active[:, 0].logical_not().all() and active[:, 1].all()  # block 0: image only; block 1 straddles
    seen = captured(dlm)
    with torch.no_grad():
        dlm.forward_noisy(x_t, ids, vision=rows)
        dlm.forward_noisy(x_t, ids, vision=rows, active=active)
    L, feats = ids.shape[1], torch.stack([r.features for r in rows.rows])
    (embeds, pos), (a_embeds, a_pos) = seen
    if arch == "qwen2_vl":  # M-RoPE: 3-D ids, not the logical ones (the image's rows and columns)
        assert pos.shape == (3, 4, 2 * L) and not torch.equal(pos[0], pos[1])
    else:
        pos = pos[None]
        a_pos = a_pos[None]
    assert torch.equal(pos[..., :L], pos[..., L:])  # the noisy copy of position p: the clean one's ids
    for half in (embeds[:, :L], embeds[:, L:]):  # image features on both streams
        assert torch.equal(half[is_image].view(4, -1, half.shape[-1]), feats)
    # only the active blocks' noisy copies are fed: every row's blocks 1.., here the same positions
    fed = active.repeat_interleave(4, dim=1)
    width = int(fed[0].sum())
    at = fed[0].nonzero().squeeze(1)
    assert a_pos.shape[-1] == width + L
    assert torch.equal(a_pos[..., :width], pos[..., L:][..., at])
    straddle = is_image[:, at]  # the straddling block's image token rides in the noisy stream with its feature
    assert straddle.any()
    assert torch.equal(a_embeds[:, :width][straddle], embeds[:, L:][:, at][straddle])


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_forward_noisy_with_images_equals_a_hand_built_forward(world, arch):
    dlm = tiny_dlm(arch, torch.float64)
    model, token = dlm.inner_model, image_token_id(dlm.inner_model.config)
    ids, maskable, images, length = batch_of(dlm, world, "sft.jsonl", seq_len=24)
    masked = maskable & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.6)
    x_t = torch.where(masked, dlm.config.mask_token_id, ids)
    B, L = ids.shape
    # by hand: the tower on the processed images, features scattered at the image tokens of both halves
    pics = [Image.open(s[0]) for s in images]
    proc = dlm.image_processor(images=pics, return_tensors="pt")
    kwargs = {"image_grid_thw": proc["image_grid_thw"]} if arch == "qwen2_vl" else \
        {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
    with torch.no_grad():
        feats = model.model.get_image_features(proc["pixel_values"].double(), **kwargs).pooler_output
        both = torch.cat([x_t, ids], 1)
        embeds = model.get_input_embeddings()(both)
        for b in range(B):
            for half in (0, L):
                where = (both[b, half:half + L] == token).nonzero().squeeze(1) + half
                embeds[b, where] = feats[b].reshape(-1, embeds.shape[-1])
        if arch == "qwen2_vl":
            table, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == token).int(),
                                                 image_grid_thw=proc["image_grid_thw"])
            position_ids = torch.cat([table, table], -1)
        else:
            position_ids = torch.arange(L).repeat(2)[None].expand(B, -1)
        mask = dlm.backend_mask(clean_context_mask(L, 4, ids.device).expand(B, -1, -1))
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        rows = training_vision(model, dlm.image_processor, ids, images)
        full, clean = dlm.forward_noisy(x_t, ids, vision=rows, with_clean=True)
        fed_only = dlm.forward_noisy(x_t, ids, vision=rows, active=blocks_with_loss(masked, 4))
        # padding after the example's last block is seen by none of its tokens
        content = torch.arange(L) < ((length + 3) // 4 * 4)[:, None]  # the example and its EOS tail
        other_pad = torch.where(content, ids, 7)
        repadded = dlm.forward_noisy(torch.where(masked, x_t, other_pad), other_pad, vision=rows)
        # the AR objective's forward: exactly the VLM's own (it computes features and M-RoPE ids itself)
        ar, _ = causal_lm_loss(model, ids, maskable, vision=rows)
        labels = torch.where(maskable, ids, -100)
        extra = {"mm_token_type_ids": (ids == token).int()} if arch == "qwen2_vl" else {}
        native = model(input_ids=ids, labels=labels, **{k: v for k, v in proc.items() if k != "pixel_values"},
                       pixel_values=proc["pixel_values"].double(), **extra).loss
    assert torch.allclose(full, ref[:, :L], atol=1e-9) and torch.allclose(clean, ref[:, L:], atol=1e-9)
    assert torch.allclose(fed_only[masked], ref[:, :L][masked], atol=1e-9)
    assert torch.allclose(ar, native, rtol=1e-9)
    assert not torch.equal(other_pad, ids) and torch.allclose(repadded[content], full[content], atol=1e-9)


@pytest.mark.parametrize("arch,n_image", [("qwen2_vl", 4), ("llava", 5)])  # 56x56: 2x2 merged patches; 4 + CLS
def test_image_tokens_are_never_masked_and_padding_starts_at_a_block_boundary(world, arch, n_image):
    dlm = tiny_dlm(arch)
    ds = build_dataset([str(world / "sft.jsonl")], dlm.tokenizer, 24, model=dlm.inner_model)
    batch = ds[:8]
    raw_ids, raw_maskable, length = batch["input_ids"], batch["maskable"], batch["length"]
    is_image = raw_ids == image_token_id(dlm.inner_model.config)
    assert is_image.sum(1).eq(n_image).all() and not raw_maskable[is_image].any()
    assert not raw_maskable[torch.arange(24) >= length[:, None]].any()  # padding: never maskable
    ids, maskable = end_blocks_with_eos(raw_ids, raw_maskable, length, 4, dlm.tokenizer.eos_token_id)
    ends = (length + 3) // 4 * 4
    assert (length % 4).any() and torch.equal(maskable.sum(1), raw_maskable.sum(1) + ends - length)
    assert not maskable[torch.arange(24) >= ends[:, None]].any()  # what is left of padding: whole blocks
    seen = {}

    def spy(x_t, x_0, **kw):
        seen["x_t"] = x_t
        return torch.zeros(*x_t.shape, 200, requires_grad=True)

    dlm.forward_noisy = spy
    diffusion_loss(dlm, ids, maskable, NoiseSettings(complementary=True, t_min=0.9), row_generators(0, 0, torch.arange(8)))
    x_t = seen["x_t"]
    masked = x_t == dlm.config.mask_token_id
    assert torch.equal(masked[:8] | masked[8:], maskable)  # the pair masks every maskable token...
    assert not masked[torch.cat([is_image, is_image])].any()  # ...and never an image token


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_resume_with_images_equals_the_unbroken_run(world, tmp_path, capsys, arch):
    unbroken = run(world, tmp_path / "a", arch, steps=4, save_every=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "model")
    capsys.readouterr()
    resumed = run(world, tmp_path / "b", arch, steps=4, save_every=2, resume=True)
    assert "at step 2" in capsys.readouterr().out
    a, b = weights(unbroken), weights(resumed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- bad data
def _bad_world(d: Path) -> None:
    red = str(d / "img" / "red.png")
    bad = {
        "count.jsonl": [{"images": [red], "prompt": "a <|image_pad|> and <|image_pad|>?", "response": " x"}],
        "missing.jsonl": [{"images": [red], "prompt": "?", "response": " x"},
                          {"images": ["img/nope.png"], "prompt": "?", "response": " x"}],
        "long.jsonl": [{"images": [red], "prompt": "colour?" * 4, "response": " red"}],
        "reply.jsonl": [{"messages": [{"role": "user", "content": "draw"},
                                      {"role": "assistant", "content": [{"type": "image", "image": red}]}]}],
        "both.jsonl": [{"images": [red], "messages": [
            {"role": "user", "content": [{"type": "image", "image": red}]}, {"role": "assistant", "content": "x"}]}],
        "notalist.jsonl": [{"images": red, "prompt": "?", "response": " x"}],
    }
    for name, rows in bad.items():
        if not (d / name).exists():
            write(d / name, rows)


BAD_DATA = [  # (model, data file, expected text in the one stderr line)
    ("qwen2_vl", "count.jsonl", "count.jsonl, row 1: the prompt has 2 image placeholders but 1 images are given"),
    ("qwen2_vl", "missing.jsonl", "missing.jsonl, row 2: image 1 not found: {w}/img/nope.png"),
    ("llava", "long.jsonl", "long.jsonl, row 1: 38 tokens (5 of them image tokens) exceed --seq-len 32"),
    ("qwen2_vl", "reply.jsonl", "reply.jsonl, row 1: an image in the response (the last message)"),
    ("llava", "both.jsonl", "both.jsonl, row 1: give the images either in 'images' or in every image part"),
    ("llava", "notalist.jsonl", "notalist.jsonl, row 1: field 'images' must be a list of image paths"),
    ("text", "sft.jsonl", "sft.jsonl, row 1: the row has images, but the model is a text-only LM"),
]


@pytest.mark.parametrize("arch,data,expected", BAD_DATA, ids=[d for _, d, _ in BAD_DATA])
def test_bad_image_data_is_one_line_naming_file_and_row(world, tiny_ar_dir, capsys, arch, data, expected):
    _bad_world(world)
    model = tiny_ar_dir if arch == "text" else world / arch
    before = snapshot(world)
    capsys.readouterr()
    code = main(["train", str(model), *FAST, "--data", str(world / data), "--out", str(world / "new")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected.replace("{w}", str(world)) in err, err
    assert snapshot(world) == before
