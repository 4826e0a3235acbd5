"""`make vlm-models`: the VLM demo pair (issue 29), built on the shipped text pair, resumably.

Stages (each skipped when its output exists; training resumes from its last checkpoint):
1. data: picture problems (edlm.recipes.picture_problems) -> PNG cards + train/val jsonl rows
   ({"images": [...], "prompt": ..., "response": ...})
2. AR VLM parent, LLaVA's two stages: a LLaVA-style model whose language model is models/ar (bit
   for bit) and whose vision side is new (a 2-layer CLIP tower on 42x42 cards, 14-pixel patches:
   9 image tokens a card, and LLaVA's 2-layer projector). Alignment: `--objective ar --train vision`
   (only the tower and projector learn) on read.jsonl, caption-like rows that ask only what number a
   card shows (a dense signal); then the whole model with `--objective ar` on the picture problems
   and the read rows -> models/vlm-ar. Why (measured): aligned on the problems alone (the card's
   digits are 2-3 of ~40 answer tokens) the frozen LM read 0 of 50 held-out cards after 600 steps,
   and trained whole from the start it learned to ignore the image tokens (the loss with another
   row's images equal to 4 decimals) before the tower had learned anything to say.
3. dLM VLM: the parent converted as `edlm convert` does (vision side bit-identical), its language
   model taken from models/dlm, which is models/ar converted and trained with the text recipe (3 h
   on these CPUs, not redone), then trained with images under the diffusion recipe's last stage
   (block diffusion + the clean stream's AR loss; the vision side frozen) -> models/vlm-dlm

Both ship in bf16 (~8 MB each); CPU loads them as fp32. Wall time on 2 CPU cores: data ~1 min,
alignment ~9, the whole parent ~8, the dLM ~6 (`bench/results/vlm-cpu`: the parent 89.8% on the
500 held-out picture problems, the dLM's `verified` 92.4% at TPF 4.70 and 2.29x HF `generate`).
Cards are mid-grey with dark digits in the middle row (see picture_problems.render_card for why).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from edlm.recipes.picture_problems import PLACEHOLDER

N_TRAIN, N_VAL = 16_000, 500
READ_PROMPT = "Question: What number does {} show?\nAnswer:"  # LLaVA-style caption rows: a dense signal to read
VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, image_size=42, patch_size=14)
DLM_DECODING = {"strategy": "verified", "threshold": 0.95, "draft_depth": 1}  # the text dLM's


def build_data(work: Path, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """train/val jsonl (image paths relative to the jsonl) and the PNG cards they name, and
    read.jsonl: half of the training cards again, asked only what number they show."""
    from tqdm.auto import tqdm

    from edlm.recipes import picture_problems

    data = work / "data"
    if (data / "read.jsonl").exists():
        return data
    (data / "cards").mkdir(parents=True, exist_ok=True)
    probs = list(picture_problems.train_problems(n_train + n_val, start=500_000))  # not the text demo's data
    for name, chunk in (("train", probs[:n_train]), ("val", probs[n_train:])):
        tmp = data / f".{name}.jsonl"
        with tmp.open("w") as f:
            for i, p in enumerate(tqdm(chunk, desc=f"cards ({name})")):
                card = f"cards/{name}-{i:06d}.png"
                if not (data / card).exists():
                    p.card().save(data / card)
                f.write(json.dumps({"images": [card], "prompt": p.prompt(PLACEHOLDER), "response": p.response}) + "\n")
        tmp.rename(data / f"{name}.jsonl")
    with (data / ".read.jsonl").open("w") as f:
        for i, p in enumerate(probs[: n_train // 2]):
            f.write(json.dumps({"images": [f"cards/train-{i:06d}.png"], "prompt": READ_PROMPT.format(PLACEHOLDER),
                                "response": f" {p.number}. #### {p.number}"}) + "\n")
    (data / ".read.jsonl").rename(data / "read.jsonl")
    return data


def vlm_tokenizer(models: Path):
    """The text dLM's tokenizer (its mask token included) with the image token after it, so parent
    and dLM share every id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models / "dlm"))
    tok.add_special_tokens({"additional_special_tokens": [PLACEHOLDER]})
    return tok


def image_processor():
    from transformers import CLIPImageProcessorPil

    side = VISION["image_size"]
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def parent_init(work: Path, models: Path) -> Path:
    """A LLaVA model: models/ar as its language model (weights copied exactly), a new vision side."""
    import torch
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    out = work / "ar-init"
    if (out / "config.json").exists():
        return out
    from edlm.files import write_dir_atomically

    tok = vlm_tokenizer(models)
    text = AutoModelForCausalLM.from_pretrained(str(models / "ar"), dtype=torch.float32)
    assert len(tok) <= text.config.vocab_size, "the text parent's vocabulary has no free row for the image token"
    torch.manual_seed(0)
    config = LlavaConfig(text_config=text.config.to_dict(), vision_config=VISION,
                         image_token_id=tok.convert_tokens_to_ids(PLACEHOLDER), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=text.config.tie_word_embeddings)
    vlm = LlavaForConditionalGeneration(config)
    vlm.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    vlm.lm_head.load_state_dict(text.lm_head.state_dict())
    write_dir_atomically(out, lambda tmp: (vlm.save_pretrained(str(tmp)), tok.save_pretrained(str(tmp)),
                                           image_processor().save_pretrained(str(tmp))))
    return out


def dlm_init(work: Path, parent: Path, models: Path) -> Path:
    """The parent converted (vision side kept bit-identical) with the text dLM's language model and
    settings: the text recipe's conversion and training, not redone."""
    import torch
    from transformers import AutoModelForCausalLM

    from edlm.config import DiffusionConfig
    from edlm.files import write_dir_atomically
    from edlm.model import load_causal_lm, read_checkpoint_config
    from edlm.train.convert import convert_model

    out = work / "dlm-init"
    if (out / "config.json").exists():
        return out
    text_cfg = DiffusionConfig.from_dict(read_checkpoint_config(models / "dlm")["edlm"])
    vlm, tok = load_causal_lm(parent, "cpu", torch.float32)
    dlm = convert_model(vlm, tok, block_size=text_cfg.block_size, mask_token="<|mask|>", shift=text_cfg.shift,
                        base_model=str(parent))
    text = AutoModelForCausalLM.from_pretrained(str(models / "dlm"), dtype=torch.float32)
    dlm.inner_model.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    dlm.inner_model.lm_head.load_state_dict(text.lm_head.state_dict())
    dlm.config = replace(text_cfg, base_model=str(parent), decoding={})
    return write_dir_atomically(out, dlm.save_pretrained)


def main(argv=None) -> None:
    from edlm.recipes.moe_model import ship  # bf16, with the dLM's default decode setting
    from edlm.train import TrainConfig
    from edlm.train import train as run_training

    def train(cfg: TrainConfig) -> Path:
        """A stage: its model when it has finished, else trained (resuming its last checkpoint)."""
        done = Path(cfg.out) / "model"
        return done if (done / "config.json").exists() else run_training(cfg)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/vlm-build", help="scratch dir (data, checkpoints)")
    ap.add_argument("--models", default="models", help="where the text pair is and the VLM pair goes")
    ap.add_argument("--align-steps", type=int, default=2000)
    ap.add_argument("--ar-steps", type=int, default=800)
    ap.add_argument("--dlm-steps", type=int, default=400)
    args = ap.parse_args(argv)
    work, models = Path(args.work), Path(args.models)
    data = build_data(work)
    common = dict(data=[str(data / "train.jsonl")], val_data=[str(data / "val.jsonl")], seq_len=192, batch_size=16,
                  eval_every=200, save_every=50, keep_last=2, resume=True, warmup_steps=20)
    if not (models / "vlm-ar" / "config.json").exists():
        aligned = train(TrainConfig(model=str(parent_init(work, models)), out=str(work / "align-run"),
                                    steps=args.align_steps, lr=1e-3, min_lr=1e-4, objective="ar", train="vision",
                                    **{**common, "data": [str(data / "read.jsonl")], "val_data": None,
                                       "seq_len": 64, "batch_size": 32, "eval_every": 0, "save_every": 100}))
        final = train(TrainConfig(model=str(aligned), out=str(work / "ar2-run"), steps=args.ar_steps, lr=3e-4,
                                  min_lr=3e-5, objective="ar", seed=1,
                                  **{**common, "data": common["data"] + [str(data / "read.jsonl")]}))
        ship(final, models / "vlm-ar")
    if not (models / "vlm-dlm" / "config.json").exists():
        init = dlm_init(work, models / "vlm-ar", models)
        final = train(TrainConfig(model=str(init), out=str(work / "dlm-run"), steps=args.dlm_steps, lr=2e-4,
                                  min_lr=2e-5, t_per_block=True, ar_loss_weight=1.0, seed=2,
                                  **{**common, "data": common["data"] + [str(data / "read.jsonl")]}))
        ship(final, models / "vlm-dlm", DLM_DECODING)


if __name__ == "__main__":
    from edlm.recipes import run_recipe

    run_recipe(main)
