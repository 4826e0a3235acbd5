"""lm-evaluation-harness adapter: evaluate edlm models with the harness everyone already trusts.

Importing this module registers the model name "edlm". The `lm_eval` CLI cannot import third-party
models by itself, so run it as `python -m edlm.lm_eval_adapter run --model edlm --model_args
pretrained=DIR,threshold=0.9 --tasks ...`, or use `edlm eval` (which calls `evaluate_tasks`).

generate_until runs our decoding engine (DiffusionLM.generate, batched, with `until` as stop
strings). loglikelihood needs an estimator, because a dLM has no single left-to-right factorisation:

- "ltr" (default): the exact log-likelihood of revealing the continuation one token at a time, left
  to right. Token p is predicted from the clean blocks before its block (decoding's KV cache) and
  its own block with positions < p revealed and positions >= p masked up to the block end (how
  decoding opens a block). Computed in one forward, not one per token: every token gets its own
  noisy copy of its block, all copies share one clean stream in the same input (see ScoringRow),
  so a request costs len(context) + block_size * len(continuation) input tokens.
  Chosen as default because it is deterministic (multiple-choice accuracy does not move with a
  sample count or seed), exact rather than a bound, follows the order the decoder roughly takes,
  is cheap for the short continuations of multiple-choice tasks, and at block size 1
  (`autoregressive=True`) is exactly the usual AR log-likelihood, so AR and dLM are comparable.
- "elbo": the masked-diffusion lower bound (LLaDA's estimator, per block): for each sample and each
  block holding continuation tokens, mask k ~ U{1..m} of its m continuation tokens and add
  (m / k) * sum of their log-probabilities; averaged over `mc_samples`. Closer to the training
  objective, but a bound with Monte-Carlo noise.

Both score with the decoder's candidate set: the mask token and padded vocabulary rows are excluded.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from edlm.decoding import candidate_logits
from edlm.errors import EdlmError
from edlm.masks import block_copies_mask

ESTIMATORS = ("ltr", "elbo")
NOISY_TOKENS_PER_ROW = 2048  # long continuations are scored in pieces of about this many noisy inputs
DEFAULT_BATCH_SIZE = 8
_PAD_GROUP = -2


# ------------------------------------------------------------------ scoring rows
@dataclass
class ScoringRow:
    """One input row: a clean stream, noisy copies of blocks, and which outputs to score.

    The order of inputs in a row is free: who sees whom is fixed by the mask and the position ids,
    not by the index. So the queries we score are moved to the end and only their logits are
    computed (logits_to_keep), while every copy shares one clean stream in one forward.
    """

    clean: list[int]  # clean tokens at positions 0..len-1
    copies: list[tuple[int, list[int]]] = field(default_factory=list)  # (block index, tokens with masks)
    queries: list[tuple[int, int]] = field(default_factory=list)  # (copy index or -1 = clean, position)
    targets: list[tuple[int, int, float]] = field(default_factory=list)  # (query index, token, weight)
    _index: dict = field(default_factory=dict, repr=False)

    def query(self, group: int, position: int) -> int:
        """Index of a scored query; a clean query shared by several targets is computed once."""
        key = (group, position)
        if key not in self._index:
            self._index[key] = len(self.queries)
            self.queries.append(key)
        return self._index[key]

    def scored_query(self, copy: int, position: int, block_size: int, shift: bool) -> int:
        """The output that predicts the token at `position` inside `copy`.

        With shift, position i is predicted at i-1; a block's first token is predicted by the clean
        stream's last position of the previous block (as in training and decoding).
        """
        if not shift:
            return self.query(copy, position)
        if position % block_size == 0:
            return self.query(-1, position - 1)
        return self.query(copy, position - 1)

    def tensors(self, block_size: int) -> tuple[list[int], list[int], list[int]]:
        """Token ids, positions and groups (-1 clean, c = copy c), scored queries last."""
        ids, pos, group = list(self.clean), list(range(len(self.clean))), [-1] * len(self.clean)
        for c, (block, tokens) in enumerate(self.copies):
            ids += tokens
            pos += range(block * block_size, block * block_size + len(tokens))
            group += [c] * len(tokens)
        where = {(g, p): i for i, (g, p) in enumerate(zip(group, pos, strict=True))}
        last = [where[q] for q in self.queries]
        moved = set(last)
        order = [i for i in range(len(ids)) if i not in moved] + last
        return [ids[i] for i in order], [pos[i] for i in order], [group[i] for i in order]


def left_to_right_row(x: list[int], start: int, block_size: int, mask_id: int | None, shift: bool) -> ScoringRow:
    """Exact log p(x[start:] | x[:start]) when tokens are revealed one at a time, left to right.

    One noisy copy of the block per scored token (its earlier positions revealed, the rest masked
    to the block end), except where shift predicts a block's first token from the clean stream.
    """
    last_block = (len(x) - 1) // block_size
    row = ScoringRow(clean=x[: last_block * block_size])
    for p in range(start, len(x)):
        block = p // block_size
        if shift and p % block_size == 0:
            q = row.query(-1, p - 1)
        else:
            first = block * block_size
            row.copies.append((block, x[first:p] + [mask_id] * (first + block_size - p)))
            q = row.scored_query(len(row.copies) - 1, p, block_size, shift)
        row.targets.append((q, x[p], 1.0))
    return row


def masked_elbo_row(x: list[int], start: int, block_size: int, mask_id: int, shift: bool, samples: int,
                    rng: random.Random) -> ScoringRow:
    """Monte-Carlo masked ELBO of x[start:]: per sample and block, mask k ~ U{1..m}, weight m / k."""
    last_block = (len(x) - 1) // block_size
    padded = x + [mask_id] * (-len(x) % block_size)  # decoding's view: a block is full, masks at its end
    row = ScoringRow(clean=x[: last_block * block_size])
    for _ in range(samples):
        for block in range(start // block_size, last_block + 1):
            first = block * block_size
            candidates = list(range(max(start, first), min(len(x), first + block_size)))
            masked = rng.sample(candidates, rng.randint(1, len(candidates)))
            tokens = padded[first : first + block_size]
            for p in masked:
                tokens[p - first] = mask_id
            row.copies.append((block, tokens))
            weight = len(candidates) / len(masked) / samples
            for p in masked:
                q = row.scored_query(len(row.copies) - 1, p, block_size, shift)
                row.targets.append((q, x[p], weight))
    return row


@torch.no_grad()
def score_rows(dlm, rows: list[ScoringRow], block_size: int, batch_size: int,
               progress: bool = False) -> list[tuple[float, bool]]:
    """Per row: (sum of weight * log p(target), every target is the argmax at its query)."""
    dev = dlm.device
    built = [r.tensors(block_size) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(built[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for s in tqdm(range(0, len(order), batch_size), disable=not progress, desc="edlm loglikelihood"):
        chunk = order[s : s + batch_size]
        width = max(len(built[i][0]) for i in chunk)
        n_query = max(len(rows[i].queries) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        pos = torch.full((len(chunk), width), -1, dtype=torch.long)
        group = torch.full((len(chunk), width), _PAD_GROUP, dtype=torch.long)
        for r, i in enumerate(chunk):  # left padding keeps every row's queries at the end
            n = len(built[i][0])
            ids[r, width - n :], pos[r, width - n :], group[r, width - n :] = map(torch.tensor, built[i])
        ids, pos, group = ids.to(dev), pos.to(dev), group.to(dev)
        mask = block_copies_mask(pos, group, block_size)
        logits = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask), position_ids=pos.clamp_min(0),
                           logits_to_keep=n_query, use_cache=False).logits
        logp = candidate_logits(dlm, logits.float()).log_softmax(-1)  # [B, n_query, V]
        greedy = logp.argmax(-1)
        for r, i in enumerate(chunk):
            row = rows[i]
            base = n_query - len(row.queries)
            q = torch.tensor([base + t[0] for t in row.targets], device=dev)
            tok = torch.tensor([t[1] for t in row.targets], device=dev)
            weight = torch.tensor([t[2] for t in row.targets], device=dev)
            lp = (logp[r, q, tok] * weight).sum().item()
            out[i] = (lp, bool((greedy[r, q] == tok).all()))
    return out


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
                 seed: int = 0, max_batch_size=None):
        super().__init__()
        from edlm.decoding import DecodeOptions, model_defaults
        from edlm.model import DiffusionLM

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
        defaults = model_defaults(self.dlm)  # unset decode options follow the checkpoint's own
        self.decode = dict(threshold=float(defaults["threshold"] if threshold is None else threshold),
                           strategy=str(strategy or defaults["strategy"]), block_size=self.block_size)
        DecodeOptions(**self.decode).validate()  # a bad flag fails now, not after the loglikelihood tasks
        self.max_gen_toks = int(max_gen_toks)
        self.estimator, self.mc_samples, self.seed = estimator, int(mc_samples), int(seed)
        self.batch_size = _batch_size(batch_size)
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
                             estimator=self.estimator, mc_samples=self.mc_samples, **self.decode,
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
