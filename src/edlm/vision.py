"""Vision-language dLMs: a Hugging Face VLM whose language model is driven as a block-diffusion LM.

The recipe needs nothing new from the vision side. Images live in the prompt only: a prompt's
image placeholders are expanded into one token per image feature (what the VLM's own processor
does), the features are computed once per request by the untouched vision tower and projector,
and wherever a forward feeds a prompt position holding an image token, its input embedding is
that position's feature (`VisionRows.inputs`, called by the decoding seam and by training). So
the image prefix sits in the exact KV cache like any clean prompt block, and every strategy
decodes with images unchanged.

Positions: edlm keeps one logical position per token (0..L-1; blocks are aligned to it). Models
with multimodal RoPE (Qwen2-VL, Qwen2.5-VL) get their 3-D position ids from that logical one:
inside the prompt, the table their own `get_rope_index` computes; after it, logical + delta (text
positions run on from the image's largest). A noisy copy of a token takes the clean one's logical
position, so it gets the same 3-D ids (BARD's copy of M-RoPE ids to the noisy stream).

Families: any `AutoModelForImageTextToText` whose image features come from `get_image_features`
(LLaVA-style: `LlavaForConditionalGeneration`; M-RoPE: the Qwen2-VL family). Processing uses the
checkpoint's own image processor and tokenizer; edlm expands the placeholders itself (as the
processors do), which avoids the processors' torchvision-only video half.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import inspect
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from edlm.errors import EdlmError

MAX_IMAGES = 8  # per prompt: more is almost always a mistake on these models' context
MAX_IMAGE_PIXELS = 4096 * 4096  # a decoded image larger than this is refused (decompression bombs too)
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # an encoded image (file, bytes, data URL)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def is_vlm(config) -> bool:
    """A vision-language model config: a language model's text_config beside a vision_config."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return get("vision_config") is not None and get("text_config") is not None


def text_config(config):
    """The language model's config (the model's own for a text-only LM)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise EdlmError(f"{type(config).__name__} names no image token (image_token_id): not a supported VLM")


def uses_mrope(model) -> bool:
    """Multimodal RoPE (the Qwen2-VL family): 3-D position ids from the model's get_rope_index."""
    return hasattr(getattr(model, "model", None), "get_rope_index")


# ---- images from users ----

def load_image(source, what: str = "image"):
    """A PIL RGB image from a PIL image, a path, bytes or a base64 data URL, with one-line errors."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    else:
        data = _image_bytes(source, what)
        if len(data) > MAX_IMAGE_BYTES:
            raise EdlmError(f"{what} is {len(data) / 2**20:.1f} MiB; at most {MAX_IMAGE_BYTES // 2**20} MiB")
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL itself raises on a bomb beyond twice this
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Image.DecompressionBombError:
            raise EdlmError(f"{what} is too large: at most {MAX_IMAGE_PIXELS} pixels") from None
        except Exception:  # noqa: BLE001 - PIL raises many kinds for a file that is no image
            raise EdlmError(f"{what} is not an image PIL can read (PNG, JPEG, GIF, WebP, ...)") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise EdlmError(f"{what} is too large: {image.width}x{image.height}, at most {MAX_IMAGE_PIXELS} pixels")
    if image.width < 1 or image.height < 1:
        raise EdlmError(f"{what} is empty")
    return image.convert("RGB")


def _image_bytes(source, what: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    text = str(source)
    if text.startswith("data:"):
        head, _, payload = text.partition(",")
        if not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise EdlmError(f"{what}: a data URL must be data:image/...;base64,...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise EdlmError(f"{what}: the data URL's base64 payload is malformed") from None
    if text.startswith(("http://", "https://")):
        raise EdlmError(f"{what}: remote image URLs are not fetched; pass a local file or a data URL")
    path = Path(text).expanduser()
    if not path.is_file():
        raise EdlmError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise EdlmError(f"{what} {path} is {path.stat().st_size / 2**20:.1f} MiB; at most "
                        f"{MAX_IMAGE_BYTES // 2**20} MiB")
    return path.read_bytes()


def load_image_processor(path):
    """The checkpoint's image processor (PIL backend where torchvision is not installed)."""
    from transformers import AutoImageProcessor

    kwargs = {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}
    try:
        return AutoImageProcessor.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise EdlmError(f"cannot load the image processor of {path}: {' '.join(str(exc).split())[:200]}") from None


# ---- a prompt's images, as the seam uses them ----

@dataclass
class VisionRow:
    """One request's images: features [N, H] in prompt order; slot [P]: for each prompt position
    the index of its feature, or -1; mrope [3, P] and delta (M-RoPE models, else None and 0)."""

    features: torch.Tensor
    slot: torch.Tensor
    mrope: torch.Tensor | None = None
    delta: int = 0

    @property
    def prompt_len(self) -> int:
        return self.slot.shape[0]

    @classmethod
    def build(cls, model, ids: torch.Tensor, features: torch.Tensor, grids: torch.Tensor | None) -> "VisionRow":
        """The row of token ids [P] whose image tokens take `features` in order: their slots and, on
        an M-RoPE model, the 3-D ids its own get_rope_index gives (`grids`: the images' (t, h, w))."""
        is_image = ids == image_token_id(model.config)
        row = cls(features, torch.where(is_image, is_image.long().cumsum(0) - 1, -1))
        if uses_mrope(model):
            fn = model.model.get_rope_index
            kwargs = {"mm_token_type_ids": is_image.int()[None], "image_grid_thw": grids}
            pos, delta = fn(ids[None], **{k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters})
            row.mrope, row.delta = pos[:, 0].to(ids.device), int(delta.reshape(-1)[0])
        return row


class ImagePrompt(list):
    """A prompt's token ids (placeholders expanded) that carries its images' VisionRow: it goes
    wherever token-id prompts go, and the cache rows built for it pick the images up."""

    def __init__(self, ids, vision: VisionRow):
        super().__init__(ids)
        self.vision = vision


def vision_of(prompts) -> list[VisionRow | None] | None:
    """The VisionRow of each prompt, or None when no prompt has images (text-only calls pay nothing)."""
    rows = [getattr(p, "vision", None) for p in prompts]
    return rows if any(r is not None for r in rows) else None


def _feature_kwargs(fn, config, inputs: dict) -> dict:
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params}
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):
        if name in params and getattr(config, name, None) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs


def processed(model, image_processor, images: list) -> dict:
    """The image processor's tensors for `images`, on the model's device (floats in its dtype)."""
    inputs = dict(image_processor(images=images, return_tensors="pt"))
    weight = model.get_input_embeddings().weight
    return {k: (v.to(weight.device, weight.dtype) if v.is_floating_point() else v.to(weight.device))
            if torch.is_tensor(v) else v for k, v in inputs.items()}


def _features(model, inputs: dict, n_images: int) -> list[torch.Tensor]:
    """The features [N, H] of each processed image: the vision tower and projector's own
    get_image_features, in the language model's embedding space and dtype."""
    fn = model.model.get_image_features
    out = fn(**_feature_kwargs(fn, model.config, inputs))
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(pooled, (list, tuple)):
        feats = [p.reshape(-1, p.shape[-1]) for p in pooled]
    elif pooled.dim() == 3 and pooled.shape[0] == n_images:
        feats = list(pooled.unbind(0))
    else:
        feats = list(pooled.reshape(n_images, -1, pooled.shape[-1]).unbind(0))
    dtype = model.get_input_embeddings().weight.dtype
    return [f.to(dtype) for f in feats]


@torch.no_grad()
def image_features(model, image_processor, images: list) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The images' features (one [N, H] each) from the untouched vision tower and projector, and
    their (t, h, w) grids [n, 3] where the model has them (M-RoPE)."""
    inputs = processed(model, image_processor, images)
    grid = inputs.get("image_grid_thw")
    return _features(model, inputs, len(images)), grid.reshape(-1, 3) if grid is not None else None


def with_placeholders(prompt: str, n_images: int, tokenizer, config) -> str:
    """A text prompt naming no image token gets one placeholder per image at its start (HF processors
    ask the caller to place them; a prompt that names none means "these images, then this text")."""
    if n_images and tokenizer.convert_ids_to_tokens(image_token_id(config)) not in prompt:
        return placeholder_text(tokenizer, config) * n_images + prompt
    return prompt


def expand_placeholders(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """`ids` with its k-th image token repeated counts[k] times (one token per image feature)."""
    out, k = [], 0
    for t in ids:
        if t == token:
            out += [token] * counts[k]
            k += 1
        else:
            out.append(t)
    return out


def placeholder_text(tokenizer, config) -> str:
    """What stands for one image in a prompt: the image token, inside the vision start/end tokens
    where the model has them (Qwen2-VL's <|vision_start|><|image_pad|><|vision_end|>)."""
    image = tokenizer.convert_ids_to_tokens(image_token_id(config))
    start, end = (getattr(config, f"vision_{k}_token_id", None) for k in ("start", "end"))
    if start is not None and end is not None:
        return tokenizer.convert_ids_to_tokens(start) + image + tokenizer.convert_ids_to_tokens(end)
    return image


def encode(dlm, prompt, images) -> ImagePrompt | list[int]:
    """A prompt (text, or token ids with one image token per image) and its images as an
    ImagePrompt: the placeholders expanded to one token per feature, the features computed.

    Text without any image placeholder gets one per image at its start (HF processors ask the
    caller to place them; a prompt that names none means "these images, then this text")."""
    model, tokenizer = dlm.inner_model, dlm.tokenizer
    if not is_vlm(model.config):
        raise EdlmError("images were given, but the model is a text-only LM (convert a vision-language model)")
    if dlm.image_processor is None:
        raise EdlmError("the model has no image processor (preprocessor_config.json): copy it from the base VLM")
    images = list(images or [])
    if len(images) > MAX_IMAGES:
        raise EdlmError(f"{len(images)} images in one prompt; at most {MAX_IMAGES}")
    images = [load_image(img, f"image {i + 1}") for i, img in enumerate(images)]
    token = image_token_id(model.config)
    if isinstance(prompt, str):
        prompt = with_placeholders(prompt, len(images), tokenizer, model.config)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    holes = ids.count(token)
    if holes != len(images):
        raise EdlmError(f"the prompt has {holes} image placeholders but {len(images)} images were given")
    if not images:
        return ids
    feats, grids = image_features(model, dlm.image_processor, images)
    out = expand_placeholders(ids, token, [f.shape[0] for f in feats])
    device = model.get_input_embeddings().weight.device
    return ImagePrompt(out, VisionRow.build(model, torch.tensor(out, device=device), torch.cat(feats), grids))


def flatten_image_parts(messages: list[dict], placeholder: str) -> tuple[list[dict], list]:
    """Chat messages whose content may be a list of parts ({"type": "text", "text": ...}, {"type":
    "image", "image": SOURCE} or OpenAI's {"type": "image_url", "image_url": {"url": ...}}) as
    messages with string content, each image part replaced by `placeholder` at its spot, and the
    image sources in order. One rendering for training data and the server: the chat template sees
    plain strings (every template handles them) and the placeholders are the model's own tokens."""
    flat, images = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            flat.append(m)
            continue
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(part.get("text", ""))
            elif kind in ("image", "image_url"):
                source = part.get("image") if kind == "image" else (part.get("image_url") or {})
                images.append(source.get("url") if isinstance(source, dict) else source)
                text.append(placeholder)
            else:
                raise EdlmError(f"a message content part of type {kind!r}: only text, image and image_url parts are read")
        flat.append({**m, "content": "".join(text)})
    return flat, images


def with_images(dlm, prompts, images) -> list:
    """Prompts paired with their images (generate's `images=`): one prompt (str or token ids) and a
    list of images, or a list of prompts and one list of images (or None) per prompt."""
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
    if single:
        prompts, images = [prompts], [images]
    prompts, images = list(prompts), list(images)
    if len(images) != len(prompts):
        raise EdlmError(f"{len(prompts)} prompts but {len(images)} image lists: give one list (or None) per prompt")
    return [p if not imgs else encode(dlm, p, imgs) for p, imgs in zip(prompts, images, strict=True)]


def hf_inputs(dlm, prompts: list[str], images: list, memo: dict | None = None) -> dict:
    """What a user of the model's HF processor feeds `generate` for text prompts and their images:
    left-padded input_ids with each placeholder expanded, attention_mask, and the image processor's
    tensors (the HF baseline of `edlm bench`: no edlm code computes the features it is given).
    memo: image_token_count's, kept by a caller that calls again (a LLaVA measures its count once)."""
    model, tok = dlm.inner_model, dlm.tokenizer
    memo = {} if memo is None else memo
    token = image_token_id(model.config)
    flat = [load_image(img) for imgs in images for img in imgs or []]
    tensors = processed(model, dlm.image_processor, flat) if flat else {}
    counts = [image_token_count(model, tensors, i, memo) for i in range(len(flat))]
    rows, seen = [], 0
    for prompt, imgs in zip(prompts, images, strict=True):
        n = len(imgs or [])
        ids = tok(with_placeholders(prompt, n, tok, model.config), add_special_tokens=True)["input_ids"]
        rows.append(expand_placeholders(ids, token, counts[seen : seen + n]))
        seen += n
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = model.get_input_embeddings().weight.device
    return {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device),
            **tensors}


class VisionRows:
    """The VisionRow (or None: text only) of each row of a batch, packed into tensors once for the
    forwards that read them: features [B, N, H], slot [B, P], mrope [3, B, P], delta and prompt
    length [B]."""

    def __init__(self, rows: list[VisionRow | None]):
        self.rows = rows
        self._packed = None

    def select(self, idx: list[int]) -> VisionRows | None:
        rows = [self.rows[i] for i in idx]
        return VisionRows(rows) if any(r is not None for r in rows) else None

    @staticmethod
    def joined(old: VisionRows | None, n_old: int, new: list[VisionRow | None] | None,
               n_new: int) -> VisionRows | None:
        """Rows [old ; new], either side possibly text-only (None): a text-only side counts its rows
        as image-free ones, so text rows joining a call with images keep every row aligned."""
        if old is None and new is None:
            return None
        return VisionRows((old.rows if old is not None else [None] * n_old) + (new or [None] * n_new))

    def _pack(self, like: torch.Tensor):
        if self._packed is None:
            real = [r for r in self.rows if r is not None]
            dev, dim = like.device, real[0].features.shape[-1]
            n_feat, n_pos = max(r.features.shape[0] for r in real), max(r.prompt_len for r in real)
            b = len(self.rows)
            feats = torch.zeros(b, n_feat, dim, dtype=real[0].features.dtype, device=dev)
            slot = torch.full((b, n_pos), -1, dtype=torch.long, device=dev)
            mrope = torch.zeros(3, b, n_pos, dtype=torch.long, device=dev)
            delta = torch.zeros(b, dtype=torch.long, device=dev)
            plen = torch.zeros(b, dtype=torch.long, device=dev)
            for i, r in enumerate(self.rows):
                if r is None:
                    continue
                feats[i, : r.features.shape[0]] = r.features
                slot[i, : r.prompt_len] = r.slot
                plen[i], delta[i] = r.prompt_len, r.delta
                if r.mrope is not None:
                    mrope[:, i, : r.prompt_len] = r.mrope
            self._packed = feats, slot, mrope, delta, plen
        return self._packed

    def inputs(self, model, positions: torch.Tensor, ids: torch.Tensor | None = None,
               embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings [B, Q, H] and position ids ([3, B, Q] for M-RoPE, else [B, Q]) of a
        forward of `ids` (or of given `embeds`: soft decoding's) at logical `positions` ([B, Q],
        -1 padding): image tokens of the prompt take their features; M-RoPE positions come from
        each row's table (prompt) or run on from it (+ delta)."""
        feats, slot, mrope, delta, plen = self._pack(positions)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        pos = positions.clamp_min(0)
        inside = pos < plen[:, None]
        at = pos.clamp(max=slot.shape[1] - 1)
        s = torch.where(inside, slot.gather(1, at), -1)
        picked = feats.gather(1, s.clamp_min(0)[..., None].expand(-1, -1, feats.shape[-1]))
        embeds = torch.where((s >= 0)[..., None], picked.to(embeds.dtype), embeds)
        if not uses_mrope(model):
            return embeds, pos
        table = mrope.gather(2, at[None].expand(3, -1, -1))
        return embeds, torch.where(inside[None], table, (pos + delta[:, None])[None])


# ---- training with images (edlm.train): a batch's images as VisionRows ----

def hf_model(model):
    """The Hugging Face model under a DDP/FSDP wrapper (`.module`) or a PEFT LoRA (`get_base_model`)."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_modules(model) -> list[torch.nn.Module]:
    """A VLM's modules outside its language model and LM head: the vision tower and the projector
    (Qwen2-VL's `visual`; LLaVA's `vision_tower` and `multi_modal_projector`)."""
    model = hf_model(model)
    decoder = model.get_decoder()
    return [m for m in model.model.children() if m is not decoder]


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters of the vision tower and projector (LoRA adapters on them included)."""
    return [p for m in vision_modules(model) for p in m.parameters()]


def image_token_count(model, tensors: dict, i: int, memo: dict) -> int:
    """How many image tokens (features) image i of `processed` tensors becomes in a prompt.
    M-RoPE models say it from the processor's grid (t*h*w patches merged spatial_merge_size^2 to
    one); others are measured once per processed shape by the vision tower itself (LLaVA: one
    measurement for every image)."""
    model = hf_model(model)
    grid = tensors.get("image_grid_thw")
    merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None)
    if grid is not None and merge:
        return int(grid.reshape(-1, 3)[i].prod()) // merge**2
    one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in tensors.items()}
    key = tuple((k, tuple(v.shape)) for k, v in sorted(one.items()) if torch.is_tensor(v))
    if key not in memo:
        with torch.no_grad():
            memo[key] = _features(model, one, 1)[0].shape[0]
    return memo[key]


def training_vision(model, image_processor, ids: torch.Tensor, sources: list[list], grad: bool = False,
                    what: str = "training image") -> VisionRows | None:
    """The VisionRows of a training batch: `ids` [B, L] with each image expanded to its image tokens
    (edlm.train.data), `sources` the images of each row in order (paths, data URLs or PIL images).
    Every row spans its whole sequence (its "prompt" is all L positions), so M-RoPE ids come from the
    model's own get_rope_index over the row, and any logical position (a noisy copy's too) gets them.
    All images of the batch go through the tower in one call. grad=False: features computed under
    no_grad with the vision modules in eval mode (a frozen tower, as decoding runs it); grad=True:
    the tower and projector learn (an AR parent learning to see). None when no row has an image."""
    if not any(sources):
        return None
    model = hf_model(model)
    images = [load_image(s, what) for row in sources for s in row]
    inputs = processed(model, image_processor, images)
    modules = vision_modules(model)
    modes = [m.training for m in modules]
    try:
        if not grad:
            for m in modules:
                m.eval()
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = _features(model, inputs, len(images))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    grids = inputs.get("image_grid_thw")
    grids = grids.reshape(-1, 3) if grids is not None else None
    token = image_token_id(model.config)
    rows, k = [], 0
    for i, row in enumerate(sources):
        if not row:
            rows.append(None)
            continue
        n = len(row)
        f = torch.cat(feats[k : k + n])
        n_tokens = int((ids[i] == token).sum())
        if n_tokens != f.shape[0]:
            raise EdlmError(f"a training row has {n_tokens} image tokens but its {n} image(s) give "
                            f"{f.shape[0]} features (an image file changed since the data was read?)")
        rows.append(VisionRow.build(model, ids[i], f, grids[k : k + n] if grids is not None else None))
        k += n
    return VisionRows(rows)
