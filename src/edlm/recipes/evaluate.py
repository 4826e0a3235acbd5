"""lm-evaluation-harness adapter: evaluate edlm models with the harness everyone already trusts.

Importing this module registers the model name "edlm". The `lm_eval` CLI cannot import third-party
models by itself, so run it as `python -m edlm.recipes.evaluate run --model edlm --model_args
pretrained=DIR,threshold=0.9 --tasks ...`, or use `edlm eval` (which calls `evaluate_tasks`).

generate_until runs our decoding engine (DiffusionLM.generate, batched, with `until` as stop
strings); loglikelihood uses edlm.decode.scoring's estimators ("ltr", exact left-to-right
unmasking, by default; "elbo", the masked-diffusion bound).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from edlm.decode.options import DecodeOptions, resolve_parent_verified
from edlm.decode.scoring import ESTIMATORS, ScoringRow, left_to_right_row, masked_elbo_row, score_rows
from edlm.errors import EdlmError
from edlm.model import DiffusionLM

NOISY_TOKENS_PER_ROW = 2048  # long continuations are scored in pieces of about this many noisy inputs
DEFAULT_BATCH_SIZE = 8


# ------------------------------------------------------------------ the lm-eval model
def _batch_size(value) -> int:
    """lm-eval passes None, an int, or "auto[:N]"; "auto" is our default (no probing run)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise EdlmError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if size < 1:
        raise EdlmError(f"batch_size must be >= 1, got {size}")
    return size


def _dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise EdlmError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


@register_model("edlm")
class EdlmLM(TemplateLM):
    """`--model edlm`: model args pretrained, threshold, strategy, block_size, max_gen_toks,
    autoregressive, estimator (ltr | elbo), mc_samples, batch_size, device, dtype, seed."""

    def __init__(self, pretrained: str, threshold: float | None = None, strategy: str | None = None,
                 block_size: int | None = None, max_gen_toks: int = 256, autoregressive: bool = False,
                 estimator: str = "ltr", mc_samples: int = 32, batch_size=None, device=None, dtype=None,
                 seed: int = 0, max_batch_size=None, verifier: str | None = None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise EdlmError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if int(mc_samples) < 1:
            raise EdlmError(f"mc_samples must be >= 1, got {mc_samples}")
        if autoregressive and block_size not in (None, 1):
            raise EdlmError("an autoregressive model decodes with block_size 1")
        if autoregressive and estimator == "elbo":
            raise EdlmError("the elbo estimator needs a diffusion model; use estimator=ltr with autoregressive")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # the lm_eval CLI asks for cuda by default; run where we can, as its hf model does
        self.dlm = DiffusionLM.from_pretrained(str(pretrained), device=device, dtype=_dtype(dtype),
                                               autoregressive=bool(autoregressive))
        self.block_size = int(block_size or self.dlm.config.block_size)
        self.tokenizer = self.dlm.tokenizer
        # unset options follow the checkpoint's own; a bad one fails now, not after the loglikelihood tasks
        self.decode = {k: v for k, v in dict(threshold=threshold, strategy=strategy, block_size=block_size).items()
                       if v is not None}
        self.options = DecodeOptions.resolve(self.dlm, **self.decode)
        self.max_gen_toks = int(max_gen_toks)
        self.estimator, self.mc_samples, self.seed = estimator, int(mc_samples), int(seed)
        self.batch_size = _batch_size(batch_size)
        # verifier: an AR parent dir; generate_until returns its greedy text, drafted by this dLM
        # (only block_size applies there: the rule every entrance of the two-model mode shares)
        self.verifier = None
        if verifier is not None:
            resolve_parent_verified(self.dlm, **self.decode)
            self.verifier = DiffusionLM.from_pretrained(str(verifier), device=device, dtype=_dtype(dtype),
                                                        autoregressive=True)
        self.pretrained, self.autoregressive = str(pretrained), bool(autoregressive)
        self.stats = {"generated_tokens": 0, "model_calls": 0}
        self._device = self.dlm.device

    # ---- tokenization (TemplateLM's contract) ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.dlm.max_positions or 1 << 30

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's own default (as lm-eval's hf model), without doubling a BOS already in text."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        """Merged into results["config"] by lm-eval: our settings and decoding speed."""
        stats = dict(self.stats, tpf=self.stats["generated_tokens"] / max(1, self.stats["model_calls"]))
        return {"edlm": dict(pretrained=self.pretrained, autoregressive=self.autoregressive,
                             estimator=self.estimator, mc_samples=self.mc_samples,
                             **{k: getattr(self.options, k) for k in ("threshold", "strategy", "block_size")},
                             generation=stats)}

    # ---- loglikelihood ----
    def _pieces(self, context: list[int], continuation: list[int]):
        """Split long continuations so a row stays small; the chain rule keeps the sum exact for ltr.

        Contexts are cut from the left so the piece plus block padding fits the model's positions.
        """
        piece = max(1, min(NOISY_TOKENS_PER_ROW // self.block_size, self.max_length // 2))
        for start in range(0, len(continuation), piece):
            part = continuation[start : start + piece]
            room = self.max_length - len(part) - self.block_size
            if room < 1:
                raise EdlmError(f"block_size {self.block_size} is too large for a model with "
                                f"{self.max_length} positions")
            yield (context + continuation[:start])[-room:], part

    def _row(self, context: list[int], part: list[int], rng: random.Random) -> ScoringRow:
        cfg, x = self.dlm.config, context + part
        if self.estimator == "ltr":
            return left_to_right_row(x, len(context), self.block_size, cfg.mask_token_id, cfg.shift)
        return masked_elbo_row(x, len(context), self.block_size, cfg.mask_token_id, cfg.shift,
                               self.mc_samples, rng)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rng = random.Random(self.seed)
        rows, owner = [], []
        for i, (_, context, continuation) in enumerate(requests):
            for ctx, part in self._pieces(list(context), list(continuation)):
                rows.append(self._row(ctx, part, rng))
                owner.append(i)
        totals = [[0.0, True] for _ in requests]
        for i, (lp, greedy) in zip(owner, score_rows(self.dlm, rows, self.block_size, self.batch_size,
                                                     progress=not disable_tqdm), strict=True):
            totals[i][0] += lp
            totals[i][1] = totals[i][1] and greedy
        results = []
        for (key, _, _), (lp, greedy) in zip(requests, totals, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (lp, greedy))
            results.append((lp, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood with the same estimator, conditioned on the prefix token."""
        reqs = [(None, [self.prefix_token_id], self.tok_encode(req.args[0], add_special_tokens=False))
                for req in requests]
        out = [lp for lp, _ in self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)]
        for req, lp in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), lp)
        return out

    # ---- generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched block-parallel decoding; `until` are stop strings, `max_gen_toks` the budget."""
        groups = defaultdict(list)  # one decode call shares stop strings and budget
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1])
            until = kwargs.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            groups[(tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature)].append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="edlm generate_until")
        for (until, budget, temperature), idx in groups.items():
            prompts = {i: self._prompt_ids(requests[i].args[0], budget) for i in idx}
            idx.sort(key=lambda i: -len(prompts[i]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if self.verifier is not None:  # the parent's greedy text; sampling would need another rule
                    res = self.dlm.generate([prompts[i] for i in chunk], max_new_tokens=budget, stop=list(until),
                                            verifier=self.verifier, block_size=self.decode.get("block_size"))
                else:
                    res = self.dlm.generate([prompts[i] for i in chunk], max_new_tokens=budget, stop=list(until),
                                            temperature=temperature, seed=self.seed, **self.decode)
                for i, text, st in zip(chunk, res.texts, res.stats, strict=True):
                    for stop in until:  # the engine cuts at stop strings; this also covers a split token
                        text = text.split(stop)[0]
                    out[i] = text
                    self.stats["generated_tokens"] += st.generated_tokens
                    self.stats["model_calls"] += st.model_calls
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _prompt_ids(self, context: str, budget: int) -> list[int]:
        if budget >= self.max_length:
            raise EdlmError(f"max_gen_toks {budget} must be below the model's {self.max_length} positions")
        ids = self.tok_encode(context) if context else [self.prefix_token_id]
        return ids[-(self.max_length - budget):]


# ------------------------------------------------------------------ the recipe
def resolve_tasks(tasks: list[str], include_path: str | None = None):
    """A TaskManager that knows every task; unknown names raise EdlmError.

    With include_path, local tasks are looked up first without indexing lm-eval's ~15k built-in
    task files (seconds saved on every run).
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EdlmError(f"--include-path is not a directory: {include_path}")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise EdlmError(f"unknown task(s): {', '.join(unknown)} (list them with `lm_eval ls tasks`; "
                        "a local YAML task needs --include-path DIR)")
    return manager


def evaluate_tasks(model: str, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
                   include_path: str | None = None, **model_args) -> dict:
    """Run lm-eval's simple_evaluate on an edlm model; model_args as for `--model_args`."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # tasks must be local: fail fast, never download
        os.environ.setdefault(var, "1")
    from lm_eval import simple_evaluate

    if not tasks:
        raise EdlmError("no task given (--tasks T1,T2)")
    args = {"pretrained": model, **{k: v for k, v in model_args.items() if v is not None}}
    lm = EdlmLM(**args)  # bad paths and flags fail before lm-eval's task index is built
    manager = resolve_tasks(tasks, include_path)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, log_samples=False)
    except (FileNotFoundError, ConnectionError) as exc:  # datasets' offline errors subclass these
        raise EdlmError(f"cannot load the task data ({str(exc).splitlines()[0]}); tasks must be local: "
                        "dataset files next to a YAML task, or a cached Hugging Face dataset") from None
    results["config"].update(model="edlm", model_args=args)
    return results


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
