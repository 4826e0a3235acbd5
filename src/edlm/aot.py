"""A decode step as one ahead-of-time compiled program: torch.export + AOTInductor (DiffusionLM.compile(aot=True)).

Why: on a CPU, a torch.compile'd forward of a small model spends a third of its time around its
kernels, not in them: dynamo checks ~1,700 guards on HF's forward (its modules, config and cache)
before every call, and the Python wrapper that launches the kernels runs ~200 small steps. An
exported program has no guards (its shapes are symbolic, checked once in C++) and AOTInductor's
wrapper is C++: the demo dLM's forward of a `verified` step (24 queries over 150 cached keys,
batch 1) takes 1.81 ms this way against 2.40 ms through torch.compile, the drafter's 2.12 against
2.91 (bench/forward.py --aot); whole decodes run 1.14-1.17x faster (bench/compiled.py).

What is exported: one forward of the hot path, every call that feeds token ids against a KV cache
with a 4-D mask in the backend's form (the steps of every decoder, and a prompt's first forward: an
empty cache goes in as CLOSED zero keys that the mask shuts, since the program's cache length is
symbolic and at least 2). Inputs: ids and
positions [B, Q], the mask, each layer's cached keys and values [B, H, P, D], and a drafter's
per-token gate [B, Q] (edlm.drafter; all False = the parent's forward); its weights are the model's
own tensors, shared (no copy; in-place writes reach it; edlm.fusion's stacked weights are buffers
of their lead layer so that the program can name them); outputs: the logits of
every query and each layer's keys and values with the Q new ones appended, which go back into the
engine's DynamicCache, so cropping, row selection and compaction work on it as before. B, Q and P
are symbolic. Every other call (an MoE model's expert plan, a VLM's image features, chosen-query
logits, a long feed that keeps few logits where the LM head is large beside the layers) goes
through torch.compile as before, so a program never sees an input it was not traced for.

The compile costs ~15 s; the package of a program that reads the model's own tensors holds no
weights, so it is kept on disk (`cache_root`) under a key of everything the trace bakes in
(`program_key`) and any later model of the same shape loads it in milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from edlm.decode.kv import contiguous_cache
from edlm.errors import EdlmError


class _Step(nn.Module):
    """The exported forward: HF's model over a DynamicCache built from the given tensors."""

    def __init__(self, model: nn.Module, gate):
        super().__init__()
        self.model, self.gate = model, gate

    def forward(self, ids, pos, mask, keys: list, values: list, noisy=None):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        for k, v in zip(keys, values, strict=True):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v  # as they are: no copy into the cache
            cache.layers.append(layer)
        with self.gate.open_on(noisy) if self.gate is not None else nullcontext():
            logits = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                                use_cache=True).logits
        return logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


CLOSED = 2  # keys fed in place of an empty cache: the program's cache length is symbolic, >= 2


class AotStep:
    """The AOT-compiled program of one model and how to call it from edlm.decode.kv.model_forward."""

    def __init__(self, dlm):
        from edlm.drafter import gate_of

        model = dlm.inner_model
        cfg = dlm.text_config
        self.layers = cfg.num_hidden_layers
        self.gate = gate_of(model)
        dtype, device = dlm.dtype, dlm.device
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        b, q, p = 2, 3, 5  # each >= 2: a size of 0 or 1 would be traced as a constant
        ids = torch.zeros(b, q, dtype=torch.long, device=device)
        pos = (p + torch.arange(q, device=device))[None].expand(b, q).contiguous()
        mask = dlm.backend_mask(torch.ones(b, q, p + q, dtype=torch.bool, device=device))
        self.mask_dtype = mask.dtype
        self.blank = (heads, head_dim, dtype)  # the closed keys an empty cache is fed as (`__call__`)
        # the program runs the LM head on every query: where that head is small beside the layers
        # (the demo's: 4%), a prompt's long feed keeping few logits is a program call too
        head = cfg.vocab_size * cfg.hidden_size
        body = sum(p.numel() for p in model.parameters()) - head * (1 if cfg.tie_word_embeddings else 2)
        self.cheap_head = head <= 0.1 * body
        kv = [torch.zeros(b, heads, p, head_dim, dtype=dtype, device=device) for _ in range(self.layers)]
        args = [ids, pos, mask, kv, [t.clone() for t in kv]]
        auto = torch.export.Dim.AUTO
        shapes = [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 2: auto, 3: auto},
                  [{0: auto, 2: auto}] * self.layers, [{0: auto, 2: auto}] * self.layers]
        if self.gate is not None:
            args.append(torch.zeros(b, q, dtype=torch.bool, device=device))
            shapes.append({0: auto, 1: auto})
        step = _Step(model, self.gate)
        live = {**dict(step.named_parameters(remove_duplicate=False)),
                **{k: v for k, v in step.named_buffers(remove_duplicate=False) if v is not None}}
        key = program_key(dlm, live, mask.dtype)
        self.shared: list[tuple[torch.Tensor, int]] = []
        self.runner = self.from_cache(key, live)
        if self.runner is None:
            self.compile(step, args, shapes, live, key)
        self.run = self.flat_runner(len(args[0:3]) + 2 * self.layers + (self.gate is not None))
        # a copy of the weights goes stale on any write to them; shared ones only when given new
        # storage (`.data =`, load_state_dict(assign=True)): calls then go through torch.compile
        self.params = list(model.parameters())
        self.stamp = self.weights_version()
        self.warned = False  # said once that the weights were replaced

    def compile(self, step: nn.Module, args: list, shapes: list, live: dict, key: str) -> None:
        """Export and AOT-compile the step (~15 s for the demo model on 2 cores); where the program
        reads the model's own tensors, keep its package in the cache under `key`."""
        model = step.model
        try:
            with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
                warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
                warnings.simplefilter("ignore", DeprecationWarning)
                program = torch.export.export(step, tuple(args), dynamic_shapes=tuple(shapes))
                needed = set(program.state_dict) | set(program.constants)
                # the program reads the model's own tensors (no copy: memory as before, in-place
                # writes reach it) where it needs only those; else it packages its copy
                shared = needed <= set(live)
                path = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(Path(tmp) / "step.pt2"),
                    inductor_configs={"aot_inductor.package_constants_in_so": not shared})
                self.runner = torch._inductor.aoti_load_package(path)
                if shared:
                    self.share(live)
                    store_program(path, key)  # weightless: any model of this shape may load it
        except Exception as e:  # an architecture torch.export cannot trace: say so in one line
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise EdlmError(f"cannot compile ahead of time: exporting {type(model).__name__} failed "
                            f"({type(e).__name__}: {first}); use --compile without aot") from None

    def flat_runner(self, n_inputs: int):
        """The program's entry on flat tensor lists. AOTInductor's Python wrapper parses both call
        specs from JSON and walks pytrees on every call (~0.15 ms, 5% of a demo step); the loader's
        own boxed_run takes the flat inputs in the order the specs give, which are checked here once
        (None: they are not what this module passes, or the loader has no such entry: the wrapper)."""
        from torch.utils import _pytree as pytree

        loader = getattr(self.runner, "loader", None)
        try:
            ins, outs = (pytree.treespec_loads(spec) for spec in loader.get_call_spec())
        except Exception:
            return None
        if ins.num_leaves != n_inputs or outs.num_leaves != 1 + 2 * self.layers or not hasattr(loader, "boxed_run"):
            return None
        return loader.boxed_run

    def share(self, live: dict) -> None:
        """Point the program's weights at the model's own tensors."""
        tensors = {name: live[name] for name in self.runner.get_constant_fqns()}
        self.runner.load_constants(tensors, check_full_update=True, user_managed=True)
        self.shared = [(t, t.data_ptr()) for t in tensors.values()]  # referenced: kept alive

    def from_cache(self, key: str, live: dict):
        """The program kept under `key` by an earlier run, its weights the model's (None: none kept,
        or it cannot be read: it is compiled again and replaced)."""
        path = cached_program(key)
        if path is None:
            return None
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
            if not set(self.runner.get_constant_fqns()) <= set(live):
                return None
            self.share(live)
            return self.runner
        except Exception as e:  # a truncated or foreign file: compile again
            warnings.warn(f"ignoring the cached AOT program {path} ({type(e).__name__}); compiling it again",
                          stacklevel=3)
            self.shared = []
            return None

    def weights_version(self) -> int:
        """What must not change for the program's weights to be the model's: shared, how many of
        them were given new storage; copied, the sum of the weights' version counters (in-place
        writes bump them; fused weights are views of their stacked tensor and share its counter)."""
        if self.shared:
            return sum(t.data_ptr() != ptr for t, ptr in self.shared)
        return sum(p._version for p in self.params)

    def fits(self, ids, embeds, mask, cache, logits_to_keep) -> bool:
        """Whether a model_forward call is one the program was traced for."""
        layers = getattr(cache, "layers", None)
        if self.weights_version() != self.stamp:
            if not self.warned:
                self.warned = True
                warnings.warn("the model's weights were replaced after compile(aot=True): decoding through "
                              "torch.compile now (compile again for the AOT program)", stacklevel=3)
            return False
        # the program computes every query's logits: a long feed that keeps few (a prompt) stays with
        # torch.compile rather than run a large LM head on all of it
        return (ids is not None and embeds is None and torch.is_tensor(mask) and mask.dim() == 4
                and mask.dtype == self.mask_dtype and isinstance(logits_to_keep, int)
                and (logits_to_keep == 0 or self.cheap_head or ids.shape[1] <= max(64, 2 * logits_to_keep))
                and layers is not None
                and (not layers or len(layers) == self.layers and cache.get_seq_length() > 0)
                and not any(getattr(layer, "is_sliding", False) for layer in layers))

    def __call__(self, ids, position_ids, mask, cache, noisy, logits_to_keep: int) -> torch.Tensor:
        """The logits (the last `logits_to_keep` queries', 0: all); the cache gets the new keys."""
        # dense inputs only: the program indexes them as it was traced, and reads a strided view
        # (a cropped cache) wrongly without a word (tested); .contiguous() costs nothing on dense ones
        empty = not cache.layers  # a prompt's first forward: CLOSED keys no query sees stand in
        if empty:
            heads, head_dim, dtype = self.blank
            blank = torch.zeros(ids.shape[0], heads, CLOSED, head_dim, dtype=dtype, device=ids.device)
            keys = values = [blank] * self.layers
            shut = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min  # sdpa's bool, eager's additive
            mask = torch.cat([torch.full(mask.shape[:-1] + (CLOSED,), shut, dtype=mask.dtype, device=mask.device), mask], -1)
        else:
            contiguous_cache(cache)
            keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        gate = []
        if self.gate is not None:
            gate = [torch.zeros_like(ids, dtype=torch.bool) if noisy is None else noisy.contiguous()]
        if self.run is not None:
            out = self.run([ids.contiguous(), position_ids.contiguous(), mask.contiguous(), *keys, *values, *gate])
            n = self.layers
            logits, keys, values = out[0], out[1 : 1 + n], out[1 + n : 1 + 2 * n]
        else:
            logits, keys, values = self.runner(ids.contiguous(), position_ids.contiguous(), mask.contiguous(), keys,
                                               values, *gate)
        if empty:
            from transformers.cache_utils import DynamicLayer

            for k, v in zip(keys, values, strict=True):
                layer = DynamicLayer()
                layer.lazy_initialization(k, v)
                cache.layers.append(layer)
            keys, values = [k[:, :, CLOSED:] for k in keys], [v[:, :, CLOSED:] for v in values]
        for layer, k, v in zip(cache.layers, keys, values, strict=True):
            layer.keys, layer.values = k, v
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


# ------------------------------------------------------------------ the program cache
def cache_root() -> Path | None:
    """Where AOT programs are kept between runs: $EDLM_CACHE_DIR/aot, by default
    $XDG_CACHE_HOME/edlm/aot (~/.cache/edlm/aot); EDLM_CACHE_DIR=off keeps none."""
    root = os.environ.get("EDLM_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edlm"
    return Path(root) / "aot"


@functools.cache
def _source_digest() -> str:
    """edlm's own code (what a traced step runs: fusion, the drafter's gate, this module): an edit
    anywhere in the package is a new program."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.relative_to(Path(__file__).parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def program_key(dlm, live: dict, mask_dtype: torch.dtype) -> str:
    """What a compiled step depends on, hashed: the library versions and sources (edlm's, the
    model class's file), the config, dtype, attention backend, mask dtype, device (CPU: the vector
    ISA the kernels were built for; CUDA: the capability), and every weight's name, shape, dtype and
    stride, and edlm's settings of the model (a drafter's LoRA scale is traced as a constant). Not
    the weight values: a cached program holds none (it reads the model's tensors)."""
    import platform

    import transformers

    model = dlm.inner_model
    device = dlm.device
    if device.type == "cuda":
        where = f"cuda{torch.cuda.get_device_capability(device)}"
    else:
        from torch._inductor import cpu_vec_isa

        where = f"{device.type}-{platform.machine()}-{cpu_vec_isa.pick_vec_isa()}"
    modeling = Path(inspect.getsourcefile(type(model)) or "")
    # edlm's settings (a drafter's LoRA scale is a constant of the trace), not how it decodes
    settings = {k: v for k, v in dataclasses.asdict(dlm.config).items() if k != "decoding"}
    parts = [torch.__version__, transformers.__version__, _source_digest(),
             hashlib.sha256(modeling.read_bytes()).hexdigest() if modeling.is_file() else type(model).__qualname__,
             model.config.to_json_string(use_diff=False), settings, str(dlm.dtype), dlm.attn_implementation, str(mask_dtype), where,
             sorted((name, tuple(t.shape), str(t.dtype), tuple(t.stride())) for name, t in live.items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def cached_program(key: str) -> Path | None:
    root = cache_root()
    path = root / f"{key}.pt2" if root is not None else None
    return path if path is not None and path.is_file() else None


def store_program(package: str, key: str) -> None:
    """Keep a compiled package under `key` (atomically: a reader sees the whole file or none); a
    cache that cannot be written only costs the next run its compile."""
    root = cache_root()
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
        os.close(fd)
        shutil.copyfile(package, tmp)
        os.replace(tmp, root / f"{key}.pt2")
    except OSError as e:
        warnings.warn(f"cannot keep the AOT program in {root} ({e.strerror or e}); the next run compiles it again",
                      stacklevel=4)


def refusal(dlm) -> str | None:
    """Why a model's decode steps cannot be exported (None: they can)."""
    from edlm.moe import is_moe
    from edlm.vision import is_vlm

    if dlm.device.type == "cpu" and dlm.dtype in (torch.bfloat16, torch.float16):
        return "a CPU model in bf16/fp16 keeps the parent's bits through a runtime switch (decode in fp32 or on a GPU)"
    if is_moe(dlm.inner_model):
        return "an MoE model's expert plans (TEAM) are read at run time"
    if is_vlm(dlm.inner_model.config):
        return "a vision-language model's image features are fed at run time"
    if dlm.attn_implementation not in ("sdpa", "eager"):
        return f"attention {dlm.attn_implementation!r} (sdpa or eager only)"
    return None
