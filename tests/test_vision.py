"""Vision-language dLMs (edlm.vision): conversion keeps the vision side, and decoding with images
is exact: the cache with image prefixes equals a no-cache recompute in which the HF model itself
places the image features (pixel_values) and computes its own 3-D M-RoPE ids over the whole text."""

import inspect

import pytest
import torch
from PIL import Image
from test_decoding import reference_decode as text_reference_decode

from edlm import vision
from edlm.decode.strategies import STRATEGIES
from edlm.errors import EdlmError
from edlm.model import DiffusionConfig, DiffusionLM
from edlm.testing import VLM_ARCHITECTURES, make_tiny_causal_lm, make_tiny_tokenizer, make_tiny_vlm
from edlm.train.convert import convert, convert_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED, GREEN = Image.new("RGB", (56, 84), (200, 30, 40)), Image.new("RGB", (28, 28), (10, 240, 40))
STRIPES = Image.new("RGB", (84, 56), (0, 0, 0))
STRIPES.paste((250, 250, 0), (0, 0, 42, 56))


def tiny_vlm_dlm(arch, block_size=4, causal_clean=False):
    model, tok, processor = make_tiny_vlm(arch, dtype=torch.float64)  # float64: no near-tie flips
    model.edlm_image_processor = processor
    dlm = convert_model(model, tok, block_size=block_size)
    dlm.config.causal_clean = causal_clean  # token-causal clean stream: what `verified` reads as the AR model
    return dlm


def image_tokens(dlm, image) -> int:
    """How many tokens one image takes, from the processor's own output (not edlm.vision's)."""
    out = dlm.image_processor(images=[image], return_tensors="pt")
    if "image_grid_thw" in out:
        merge = dlm.inner_model.config.vision_config.spatial_merge_size
        return int(out["image_grid_thw"].prod()) // merge**2
    cfg = dlm.inner_model.config.vision_config
    return (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + CLS ("full" feature selection)


def expanded_ids(dlm, prompt, images):
    """Prompt ids with each image's placeholders (at the text's start) expanded by hand."""
    token = vision.image_token_id(dlm.inner_model.config)
    start, end = (getattr(dlm.inner_model.config, f"vision_{k}_token_id", None) for k in ("start", "end"))
    ids = dlm.tokenizer(prompt)["input_ids"]
    head = []
    for image in images:
        head += ([start] if start is not None else []) + [token] * image_tokens(dlm, image) + \
            ([end] if end is not None else [])
    return head + ids


def pixel_inputs(dlm, images):
    out = dlm.image_processor(images=list(images), return_tensors="pt")
    return {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in out.items()}


def hf_forward(dlm, ids, images, mask):
    """One forward of the whole sequence through the HF VLM: it places the image features itself."""
    model = dlm.inner_model
    inputs = pixel_inputs(dlm, images) if images else {}
    t = torch.tensor([ids])
    if vision.uses_mrope(model):
        kw = {"image_grid_thw": inputs.get("image_grid_thw"), "mm_token_type_ids":
              (t == vision.image_token_id(model.config)).int()}
        kw = {k: v for k, v in kw.items() if k in inspect.signature(model.model.get_rope_index).parameters}
        positions, _ = model.model.get_rope_index(t, **kw)
    else:
        positions = torch.arange(len(ids))[None]
    return model(input_ids=t, attention_mask=dlm.backend_mask(mask), position_ids=positions,
                 **inputs).logits[0].float()


def reference_decode(dlm, prompt, images, max_new, threshold):
    """test_decoding's no-cache reference (the threshold rule), each forward through the HF VLM."""
    return text_reference_decode(dlm, expanded_ids(dlm, prompt, images), max_new, dlm.config.block_size,
                                 forward=lambda d, ids, mask: hf_forward(d, ids, images, mask), threshold=threshold)


def no_eos(dlm):
    dlm.tokenizer.eos_token = "~"  # a random model may say <eos> early: keep the rows long


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
@pytest.mark.parametrize("images", [[RED], [GREEN, STRIPES]], ids=["one image", "two images"])
@pytest.mark.parametrize("threshold", [1.0, 0.3])
def test_cached_decoding_with_images_equals_no_cache_reference(arch, images, threshold):
    dlm = tiny_vlm_dlm(arch)
    no_eos(dlm)
    for prompt in ["Hi", "What is it?"]:  # image prefixes of other lengths mod the block
        got = dlm.generate(prompt, images=images, max_new_tokens=10, threshold=threshold).token_ids[0]
        assert got == reference_decode(dlm, prompt, images, 10, threshold), prompt


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_images_change_the_answer_and_text_rows_are_plain(arch):
    """The features really reach the model, and a text-only prompt of a VLM is its language model's."""
    dlm = tiny_vlm_dlm(arch)
    no_eos(dlm)
    red = dlm.generate("Hi", images=[RED], max_new_tokens=8, threshold=0.3).token_ids[0]
    stripes = dlm.generate("Hi", images=[STRIPES], max_new_tokens=8, threshold=0.3).token_ids[0]
    assert red != stripes
    text = dlm.generate("Hi", max_new_tokens=8, threshold=0.3).token_ids[0]
    assert text == reference_decode(dlm, "Hi", [], 8, 0.3)


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_batched_equals_alone_with_other_image_sizes_and_counts(arch):
    dlm = tiny_vlm_dlm(arch, causal_clean=True)
    no_eos(dlm)
    prompts = ["Hi", "What is it?", "ab", "Two?"]
    images = [[RED], None, [GREEN], [STRIPES, GREEN]]
    for strategy in ("threshold", "verified", "psd"):
        kw = {"strategy": strategy, **({"threshold": 0.3} if "threshold" in STRATEGIES[strategy].reads else {})}
        batched = dlm.generate(prompts, images=images, max_new_tokens=[9, 6, 11, 9], **kw)
        for i, (p, imgs) in enumerate(zip(prompts, images, strict=True)):
            alone = dlm.generate(p, images=imgs, max_new_tokens=[9, 6, 11, 9][i], **kw)
            assert batched.token_ids[i] == alone.token_ids[0], (strategy, i)


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_rows_joining_a_running_call_keep_their_images_aligned(arch):
    """A text-only row joining a call with images, and an image row joining a text-only call (a
    server's stream of requests), each decode as alone. The text joiner once left the call's image
    rows one short, and the next forward failed on the size mismatch."""
    dlm = tiny_vlm_dlm(arch)
    no_eos(dlm)
    for first, joiner in (([RED], None), (None, [GREEN])):
        late = [vision.encode(dlm, "What is it?", joiner)] if joiner else ["What is it?"]
        queue = [(late, [7], None)]
        got = dlm.generate("Hi", images=first, max_new_tokens=9, threshold=0.3,
                           admit=lambda q=queue: q.pop() if q else None)
        assert got.token_ids[0] == dlm.generate("Hi", images=first, max_new_tokens=9, threshold=0.3).token_ids[0]
        alone = dlm.generate("What is it?", images=joiner, max_new_tokens=7, threshold=0.3)
        assert got.token_ids[1] == alone.token_ids[0]


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_every_strategy_decodes_with_images(arch):
    """Each registered strategy runs with an image; the lossless ones agree with `verified`."""
    dlm = tiny_vlm_dlm(arch, causal_clean=True)
    no_eos(dlm)
    out = {}
    for name in STRATEGIES:
        res = dlm.generate("What?", images=[RED], max_new_tokens=8, strategy=name)
        assert res.stats[0].generated_tokens == 8, name
        out[name] = res.token_ids[0]
    assert out["verified"] == reference_ar(dlm, "What?", [RED], 8)


@torch.no_grad()
def reference_ar(dlm, prompt, images, n):
    """Greedy next-token decoding of the clean stream (token-causal), recomputed from scratch; it
    ends after EOS."""
    seq = expanded_ids(dlm, prompt, images)
    for i in range(n):
        if i and seq[-1] == dlm.tokenizer.eos_token_id:
            return seq[-i:]
        logits = hf_forward(dlm, seq, images, torch.ones(len(seq), len(seq), dtype=torch.bool).tril())[-1]
        if dlm.config.mask_token_id is not None:  # a dLM never says its mask token; an AR parent has none
            logits[dlm.config.mask_token_id] = float("-inf")
        seq = seq + [int(logits[: len(dlm.tokenizer)].argmax())]
    return seq[-n:]


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_parent_verified_pair_with_images_gives_the_parents_greedy_text(arch):
    model, tok, processor = make_tiny_vlm(arch, dtype=torch.float64, seed=1)
    model.edlm_image_processor = processor
    parent = DiffusionLM(model, tok, DiffusionConfig.autoregressive())
    dlm = tiny_vlm_dlm(arch)  # another seed: its drafts are often wrong
    for d in (dlm, parent):
        no_eos(d)
    prompts, images = ["Hi", "What is it?"], [[RED], [GREEN, STRIPES]]
    got = dlm.generate(prompts, images=images, max_new_tokens=9, verifier=parent)
    for i in range(2):
        assert got.token_ids[i] == reference_ar(parent, prompts[i], images[i], 9), i


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_convert_keeps_vision_weights_and_saves_the_processor(arch, tmp_path):
    model, tok, processor = make_tiny_vlm(arch)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    processor.save_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(base, tmp_path / "dlm", block_size=4)
    dlm = DiffusionLM.from_pretrained(tmp_path / "dlm")
    assert type(dlm.inner_model).__name__ == type(model).__name__
    after = dlm.inner_model.state_dict()
    vision_keys = [k for k in before if "visual" in k or "vision_tower" in k or "projector" in k]
    assert vision_keys
    for k in vision_keys:
        assert torch.equal(before[k], after[k]), k
    assert (tmp_path / "dlm" / "preprocessor_config.json").is_file()
    assert dlm.image_processor is not None
    assert dlm.config.mask_token_id is not None
    # the saved model decodes with an image exactly as the freshly converted one does
    fresh = tiny_vlm_dlm(arch)
    assert dlm.generate("Hi", images=[RED], max_new_tokens=6).token_ids[0] == \
        fresh.generate("Hi", images=[RED], max_new_tokens=6).token_ids[0]


def test_image_errors_are_one_line():
    dlm = tiny_vlm_dlm("llava")
    text_only = convert_model(make_tiny_causal_lm("llama"), make_tiny_tokenizer(), block_size=4)
    with pytest.raises(EdlmError, match="text-only"):
        text_only.generate("Hi", images=[RED], max_new_tokens=2)
    with pytest.raises(EdlmError, match="2 image placeholders but 1"):
        dlm.generate("<image><image>Hi", images=[RED], max_new_tokens=2)
    with pytest.raises(EdlmError, match="not an image"):
        dlm.generate("Hi", images=[b"no image here"], max_new_tokens=2)
    with pytest.raises(EdlmError, match="not found"):
        dlm.generate("Hi", images=["/nonexistent/x.png"], max_new_tokens=2)
    with pytest.raises(EdlmError, match="remote image URLs"):
        dlm.generate("Hi", images=["https://example.com/x.png"], max_new_tokens=2)
    with pytest.raises(EdlmError, match="at most"):
        dlm.generate("Hi", images=[GREEN] * (vision.MAX_IMAGES + 1), max_new_tokens=2)
    with pytest.raises(EdlmError, match="one list"):
        dlm.generate(["a", "b"], images=[[RED]], max_new_tokens=2)


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_ar_engine_with_images_equals_hf_generate(arch):
    """The engine's AR path of a VLM parent gives HF `generate`'s tokens, fed what a user of the HF
    processor feeds it (edlm.vision.hf_inputs: expanded placeholders, pixel tensors), batched too."""
    model, tok, processor = make_tiny_vlm(arch, seed=3)
    model.edlm_image_processor = processor
    ar = DiffusionLM(model, tok, DiffusionConfig.autoregressive())
    prompts, images = ["Hi there", "What is it?"], [[RED], [GREEN, STRIPES]]
    beyond = list(range(len(tok), model.config.text_config.vocab_size))  # ids no token has: the engine never says them
    for rows in ([0], [1], [0, 1]):
        enc = vision.hf_inputs(ar, [prompts[i] for i in rows], [images[i] for i in rows])
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, suppress_tokens=beyond,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        got = ar.generate([prompts[i] for i in rows], images=[images[i] for i in rows], max_new_tokens=10)
        for j, row in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            assert got.token_ids[j] == row, (rows, j)
