"""Native evaluator: the two task shapes a search scores most often, computed directly and several times faster than
through the harness, with the same numbers.

- Multiple choice (and single ``loglikelihood``) tasks: every choice's loglikelihood; the shared prompt of a
  document is run once and its KV cache is reused for all choices (when the model's cache can be re-indexed);
  the per-document results go through the task's own ``process_results`` and aggregation, so ``acc``,
  ``acc_norm`` etc. are lm-eval's definitions.
- Exact match of a short greedy generation (``generate_until`` + ``exact_match`` without options): a document
  matches iff greedy decoding produces the target and then stops. Where the target's tokens decode back to the
  target, one teacher-forced forward decides almost every document (greedy output equals the target iff every
  argmax equals the next target token, and the token after the target ends the answer: EOS, a stop string or the
  budget); the undecided rest is decoded greedily with a KV cache, dropping a row as soon as its text cannot
  become the target any more.

Documents whose prompts start with the same tokens (a task description, the same few-shot examples, a BOS and a
marker) share them: per batch that prefix is run once, for one row, and every document of the batch continues from
its KV cache (``share_prompts``; with the search's prefix store on, the prefix's call is served from the store after
its first run). Scores agree with the unshared computation up to float rounding (the shared tokens are computed in
a batch of one instead of inside each padded batch).

Prompts are built by lm-eval itself (the task's YAML, Jinja templates, few-shot sampler, delimiters) once, at
preparation; they are tokenised once too, by the :class:`dfsmerge.objectives.lm_adapter.Scorer` the lm-eval adapter
uses, which also runs every forward pass. lm-eval's task objects are read through
:mod:`dfsmerge.objectives.lm_eval_compat` only. Anything
else (filters, metric options, sampling, rolling loglikelihood, multiple targets) raises :class:`ConfigError`
naming the feature: use the lm-eval path (``native: false``) for those tasks.

Assumption: a tokenizer's ``decode`` of a token prefix is a prefix of the decode of the whole sequence (true of
word-level, character-level and whole-character BPE vocabularies; an answer split inside a multi-byte UTF-8
character could violate it).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.lm_adapter import Scorer, model_device
from dfsmerge.objectives.lm_eval_compat import memoize_doc_fields, metric_options, pad_and_concat, prepared_instances

_MC_TYPES = ("multiple_choice", "loglikelihood")
_NO_MATCH = "\u241f"  # appended to the target: a response that is certainly not the target


def _unsupported(task, what: str) -> ConfigError:
    return ConfigError(f"task {task.task_name!r} needs {what}, which the native evaluator does not do exactly; "
                       "set native: false for this objective (the lm-eval path supports it)")


def _select_cache(cache, index: torch.Tensor) -> bool:
    fn = getattr(cache, "batch_select_indices", None)
    if fn is None:
        return False
    fn(index)
    return True


MIN_SHARED_TOKENS = 8
"""A shared prompt prefix shorter than this is not run on its own: the extra one-row pass and the batch's cached,
masked pass cost more than they save (measured on the toy zoo, 2 shared tokens of ~10 per document: searches took
1.3-1.4x the wall time)."""


def _common_prefix(prompts: list[list[int]], min_tokens: int = MIN_SHARED_TOKENS) -> list[int]:
    """The tokens every prompt starts with, leaving every prompt at least one token of its own (its last token's
    logits are read); empty when shorter than ``min_tokens`` (not worth a forward pass of its own)."""
    if not prompts:
        return []
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return list(first[:n]) if n >= min_tokens else []


def _nested(reqs, idx: list[int]) -> dict[int, list[int]]:
    """``{i: [j, ...]}``: request ``i``'s context + continuation tokens strictly extend each ``j``'s (and no request
    extends ``i``'s); only groups with at least one ``j``. Sorted lexicographically, a sequence that is a prefix of
    another is immediately followed by one of its extensions, so one pass from the end finds every chain's longest
    member (the calculator steps of one worked answer: each step's request is a prefix of the next one's)."""
    full = {i: tuple(reqs[i][1] + reqs[i][2]) for i in idx}
    order = sorted(idx, key=full.__getitem__)
    top: dict[int, int] = {}
    for j in range(len(order) - 1, -1, -1):
        i = order[j]
        top[i] = i
        if j + 1 < len(order):
            nxt = order[j + 1]
            a, b = full[i], full[nxt]
            if len(b) > len(a) and b[:len(a)] == a:
                top[i] = top[nxt]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in top.items():
        if t != i:
            groups[t].append(i)
    return dict(groups)


class NativeTask:
    """A task prepared for native scoring.

    Args:
        task: a loaded lm-eval ``Task`` (num_fewshot and few-shot seed already set).
        limit: number of documents (as lm-eval's ``limit``), None for all.
        tokenizer: the tokenizer shared by every candidate of the search.
        batch_size: documents per forward pass.
        max_gen_toks: generation budget when the task sets none.
        prefix_cache: run a document's prompt once for all its choices (multiple choice).
        share_prompts: run the prompt prefix every document of the task shares (at least
            :data:`MIN_SHARED_TOKENS`) once per batch.
        chat_args: lm-eval's ``apply_chat_template`` / ``system_instruction`` / ``fewshot_as_multiturn``
            (:attr:`dfsmerge.objectives.config.ObjectiveConfig.chat_args`): the prompts lm-eval's harness builds.

    Raises:
        ConfigError: the task needs a feature the native evaluator does not support.
    """

    def __init__(self, task, *, limit: int | None, tokenizer, batch_size: int = 16, max_gen_toks: int = 256,
                 prefix_cache: bool = True, share_prompts: bool = True, chat_args: dict | None = None) -> None:
        self.task = task
        self.kind = task.OUTPUT_TYPE
        self.prefix_cache = prefix_cache
        self.share_prompts = share_prompts
        self.forward_calls = 0
        self.prefix_fallbacks = 0  # batches the prefix cache could not serve (cache not re-indexable)
        if self.kind not in _MC_TYPES + ("generate_until",):
            raise _unsupported(task, f"output_type={self.kind!r}")
        if task.config.filter_list:
            raise _unsupported(task, "a filter_list")
        if callable(task.config.process_results):
            raise _unsupported(task, "a custom process_results")
        if getattr(task, "multiple_input", False):
            raise _unsupported(task, "multiple inputs (choices in the context)")
        self.scorer = Scorer(tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
        by_doc: dict[int, list] = defaultdict(list)
        chat = dict(chat_args or {})  # lm-eval's prompt options, rendered with HFLM.apply_chat_template's rules
        name = str(getattr(self.scorer.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")
        for inst in prepared_instances(task, limit, chat_template=self.scorer.apply_chat_template,
                                       tokenizer_name=name, **chat):
            by_doc[inst.doc_id].append(inst)
        self.doc_ids = sorted(by_doc)
        self.docs = [by_doc[d][0].doc for d in self.doc_ids]
        insts = [sorted(by_doc[d], key=lambda i: i.idx) for d in self.doc_ids]
        memoize_doc_fields(task, self.docs)
        if self.kind in _MC_TYPES:
            self.n_req = [len(x) for x in insts]
            self.req_start = list(accumulate(self.n_req, initial=0))  # document d's first request
            self.requests = self.scorer.encode_requests([i.arguments for x in insts for i in x])
            prompts = [r[1] for r in self.requests]
        else:
            self._prepare_generation(insts)
            prompts = [g["prompt"] for g in self.gen]
        self.shared: list[int] = _common_prefix(prompts) if share_prompts and prefix_cache else []

    # ---- preparation of generation tasks -------------------------------------------------------------
    def _prepare_generation(self, insts) -> None:
        task, sc, tok = self.task, self.scorer, self.scorer.tokenizer
        metrics = metric_options(task)
        if set(metrics) != {"exact_match"}:
            raise _unsupported(task, f"metrics {sorted(metrics)} (native supports exact_match only)")
        if any(metrics["exact_match"].values()):
            raise _unsupported(task, f"exact_match options {metrics['exact_match']}")
        if getattr(task, "multiple_target", False):
            raise _unsupported(task, "multiple targets per document")
        self.gen: list[dict[str, Any]] = []
        for doc, (inst,) in zip(self.docs, insts, strict=True):
            context, gen_kwargs = inst.arguments
            until, max_gen = sc.generation_settings(gen_kwargs, task=task.task_name)
            gold = task.doc_to_target(doc)
            if task.config.doc_to_choice is not None:
                gold = task.doc_to_choice(doc)[gold]
            if isinstance(gold, list):
                raise _unsupported(task, "a list of targets per document")
            gold = str(gold)
            ids, _ = sc.encode_batch([context])  # truncated at scoring time, to the model's max_length
            target = tok.encode(gold, add_special_tokens=False)
            forcible = (0 < len(target) <= max_gen and tok.decode(target, skip_special_tokens=True) == gold
                        and tok.decode(target, skip_special_tokens=False) == gold
                        and not any(s and s in gold for s in until))
            self.gen.append(dict(prompt=ids[0].tolist(), gold=gold, until=until, max_gen=max_gen,
                                 target=target if forcible else None))

    # ---- scoring -------------------------------------------------------------------------------------
    def evaluate(self, model) -> dict[str, float]:
        """Score ``model``; returns ``{metric key: value}`` as lm-eval reports them (filter ``none``)."""
        values = self.per_doc(model)
        agg = self.task.aggregation()
        return {f"{m},none": float(agg[m](v)) for m, v in values.items()}

    def per_doc(self, model, positions=None) -> dict[str, list]:
        """Each document's metric values (``process_results``), for the documents at ``positions`` of
        :attr:`docs` (default all), in that order: ``{metric: [value per document]}``."""
        positions = range(len(self.docs)) if positions is None else positions
        before = self.scorer.forward_calls
        if self.kind in _MC_TYPES:
            idx = [self.req_start[p] + r for p in positions for r in range(self.n_req[p])]
            flat = self._loglikelihoods(model, idx)
            per_doc, pos = [], 0
            for p in positions:
                per_doc.append(flat[pos:pos + self.n_req[p]])
                pos += self.n_req[p]
        else:
            matches = self._exact_matches(model, positions)
            per_doc = [[self.gen[p]["gold"] if m else self.gen[p]["gold"] + _NO_MATCH]
                       for p, m in zip(positions, matches, strict=True)]
        self.forward_calls += self.scorer.forward_calls - before
        values: dict[str, list] = defaultdict(list)
        for p, res in zip(positions, per_doc, strict=True):
            for metric, v in self.task.process_results(self.docs[p], res).items():
                values[metric].append(v)
        return dict(values)

    # multiple choice ---------------------------------------------------------------------------------
    def _loglikelihoods(self, model, idx: list[int] | None = None) -> list[tuple[float, bool]]:
        """The answers to the requests at ``idx`` of :attr:`requests` (default all), in that order."""
        reqs = self.requests if idx is None else [self.requests[i] for i in idx]
        sc = self.scorer
        if not self.prefix_cache:
            return sc.score(model, reqs)
        max_len = sc.window(model)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        plain: list[int] = []
        per_ctx: dict[tuple[int, ...], int] = defaultdict(int)
        for _, ctx, _ in reqs:
            per_ctx[tuple(ctx)] += 1
        # requests alone with their context (a loglikelihood task's; choices sharing a context are served by the
        # prefix cache below) may nest in a longer one
        fits = [i for i, (_, ctx, cont) in enumerate(reqs)
                if len(ctx) + len(cont) <= max_len + 1 and per_ctx[tuple(ctx)] == 1]
        out: list[tuple[float, bool] | None] = [None] * len(reqs)
        nested = _nested(reqs, fits)
        if nested:
            self._score_nested(model, reqs, nested, out)
        for i, (_, ctx, cont) in enumerate(reqs):
            if out[i] is not None:
                continue
            if len(ctx) + len(cont) > max_len + 1:
                plain.append(i)  # needs left truncation: the plain path does it as HFLM
            else:
                groups[tuple(ctx)].append(i)
        keys = sorted(groups, key=len, reverse=True)
        bs = sc.batch_size
        for s in range(0, len(keys), bs):
            fallback = self._score_prefix_batch(model, reqs, keys[s:s + bs], groups, out)
            plain.extend(fallback)
        if plain:
            for i, r in zip(plain, sc.score(model, [reqs[i] for i in plain]), strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def _score_prefix_batch(self, model, reqs, keys, groups, out) -> list[int]:
        """Score the choices of a batch of shared contexts; returns request indices (into ``reqs``) it could not
        score."""
        sc, dev = self.scorer, model_device(model)
        pad = sc.pad_token_id
        B = len(keys)
        cache, P = self._shared_cache(model, B)
        T = max(len(k) for k in keys) - P
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, k in enumerate(keys):  # left padding: every context ends at column T - 1 (after the shared prefix)
            ids[b, T - len(k) + P:] = torch.tensor(k[P:])
            mask[b, T - len(k) + P:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = P + (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        seen = torch.cat([torch.ones((B, P), dtype=torch.long, device=dev), mask], dim=1)  # (B, P + T)
        o = sc.forward(model, ids, attention_mask=seen, position_ids=pos, cache=cache, use_cache=True)
        last = F.log_softmax(o.logits[:, -1, :], dim=-1)  # (B, V): predicts each continuation's 1st token
        rows = [(b, i) for b, k in enumerate(keys) for i in groups[k]]
        long_rows = [(b, i) for b, i in rows if len(reqs[i][2]) > 1]
        lp_rest = None
        if long_rows:
            cache = o.cache
            index = torch.tensor([b for b, _ in long_rows], device=dev)
            if cache is None or not _select_cache(cache, index):
                self.prefix_fallbacks += 1
                return [i for _, i in rows]
            L = max(len(reqs[i][2]) - 1 for _, i in long_rows)
            R = len(long_rows)
            cin = torch.full((R, L), pad, dtype=torch.long)
            cmask = torch.zeros((R, L), dtype=torch.long)
            for r, (_, i) in enumerate(long_rows):
                c = reqs[i][2][:-1]  # the last token is predicted, never input
                cin[r, :len(c)] = torch.tensor(c)
                cmask[r, :len(c)] = 1
            cin, cmask = cin.to(dev), cmask.to(dev)
            ctx_len = P + mask.sum(-1)[index]  # (R,)
            cpos = ctx_len[:, None] + torch.arange(L, device=dev)[None, :]  # (R, L)
            full_mask = torch.cat([seen[index], cmask], dim=1)  # (R, P + T + L)
            o2 = sc.forward(model, cin, attention_mask=full_mask, position_ids=cpos, cache=cache, use_cache=True)
            lp_rest = F.log_softmax(o2.logits, dim=-1)  # (R, L, V), in the logits' dtype as the adapter
        row_of = {i: r for r, (_, i) in enumerate(long_rows)}
        for b, i in rows:
            cont = reqs[i][2]
            first = last[b]  # (V,)
            ll = float(first[cont[0]])
            greedy = int(first.argmax()) == cont[0]
            if len(cont) > 1:
                lp = lp_rest[row_of[i], :len(cont) - 1]  # (c - 1, V)
                tgt = torch.tensor(cont[1:], device=dev)
                ll += float(lp.gather(1, tgt[:, None]).sum())
                greedy = greedy and bool((lp.argmax(-1) == tgt).all())
            out[i] = (ll, greedy)
        return []

    def _score_nested(self, model, reqs, nested: dict[int, list[int]], out) -> None:
        """Score every request of ``nested`` (``{longest request: [requests whose context + continuation is a
        prefix of its own]}``) from one causal forward pass over each longest request: a position's logits depend on
        the tokens up to it only, so the shorter requests' answers are slices of it (the plain path's arithmetic,
        right padding, no cache)."""
        sc, dev = self.scorer, model_device(model)
        reps = sorted(nested, key=lambda i: -len(reqs[i][1]) - len(reqs[i][2]))
        bs = max(1, sc.batch_size // 2)  # every position's logits are kept: half the rows of a plain batch
        for s in range(0, len(reps), bs):
            chunk = reps[s:s + bs]
            inps = [torch.tensor((reqs[r][1] + reqs[r][2])[:-1], dtype=torch.long, device=dev) for r in chunk]
            L = max(x.shape[0] for x in inps)
            lp_all = sc.forward(model, pad_and_concat(L, inps, padding_side="right")).logits  # (B, L, V)
            for b, r in enumerate(chunk):
                for i in (r, *nested[r]):
                    _, ctx, cont = reqs[i]
                    lp = F.log_softmax(lp_all[b, len(ctx) - 1:len(ctx) + len(cont) - 1], dim=-1)
                    tgt = torch.tensor(cont, dtype=torch.long, device=dev)
                    out[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))

    def _shared_cache(self, model, rows: int):
        """``(cache, P)``: the KV cache of the task's shared prompt prefix (P tokens) re-indexed to ``rows`` rows,
        or ``(None, 0)`` when there is none or the model's cache cannot be re-indexed."""
        if not self.shared:
            return None, 0
        dev = model_device(model)
        P = len(self.shared)
        ids = torch.tensor([self.shared], dtype=torch.long, device=dev)
        o = self.scorer.forward(model, ids, attention_mask=torch.ones_like(ids),
                                position_ids=torch.arange(P, device=dev)[None, :], use_cache=True)
        cache = o.cache
        if cache is None or not _select_cache(cache, torch.zeros(rows, dtype=torch.long, device=dev)):
            self.prefix_fallbacks += 1
            return None, 0
        return cache, P

    # exact match of greedy generation -----------------------------------------------------------------
    def _exact_matches(self, model, positions=None) -> list[bool]:
        """Whether greedy generation matches the target, for the documents at ``positions`` (default all, in that
        order)."""
        positions = range(len(self.gen)) if positions is None else positions
        decided: list[bool | None] = [None] * len(self.gen)
        forcible = [j for j in positions if self.gen[j]["target"] is not None]
        bs = self.scorer.batch_size
        forcible.sort(key=lambda j: -(len(self.gen[j]["prompt"]) + len(self.gen[j]["target"])))
        for s in range(0, len(forcible), bs):
            self._teacher_forced(model, forcible[s:s + bs], decided)
        rest = [j for j in positions if decided[j] is None]
        rest.sort(key=lambda j: -len(self.gen[j]["prompt"]))
        for s in range(0, len(rest), bs):
            self._greedy(model, rest[s:s + bs], decided)
        return [bool(decided[j]) for j in positions]

    def _final_text(self, model, g, toks: list[int]) -> str | None:
        """The response if the generation has ended after ``toks`` (EOS or a stop string), else None."""
        tok = self.scorer.tokenizer
        if toks and toks[-1] in self.scorer.eos_ids(model):
            return self._cut(g, tok.decode(toks, skip_special_tokens=True))
        if any(s and s in tok.decode(toks, skip_special_tokens=False) for s in g["until"]):
            return self._cut(g, tok.decode(toks, skip_special_tokens=True))
        if len(toks) >= g["max_gen"]:
            return self._cut(g, tok.decode(toks, skip_special_tokens=True))
        return None

    def _prompt(self, model, g, window: int | None = None) -> list[int]:
        window = self.scorer.window(model) if window is None else window
        room = window - g["max_gen"]
        if room <= 0:
            raise ConfigError(f"task {self.task.task_name!r}: max_gen_toks={g['max_gen']} is not below the model's "
                              f"max_length={window}; lower generation_kwargs.max_gen_toks")
        return g["prompt"][-room:]  # HFLM's left truncation

    @staticmethod
    def _cut(g, text: str) -> str:
        for s in g["until"]:
            if s:
                text = text.split(s)[0]
        return text

    @staticmethod
    def _can_still_match(g, text: str) -> bool:
        gold = g["gold"]
        return gold.startswith(text) or any(s and (gold + s).startswith(text) for s in g["until"])

    def _teacher_forced(self, model, batch: list[int], decided: list) -> None:
        sc, dev = self.scorer, model_device(model)
        pad = sc.pad_token_id
        window = sc.window(model)  # once per batch: resolving it reads the model's config
        prompts = [self._prompt(model, self.gen[j], window) for j in batch]
        truncated = any(len(x) < len(self.gen[j]["prompt"]) for x, j in zip(prompts, batch, strict=True))
        B = len(batch)
        cache, P = (None, 0) if truncated else self._shared_cache(model, B)
        seqs = [x[P:] + self.gen[j]["target"] for x, j in zip(prompts, batch, strict=True)]
        T = max(len(x) for x in seqs)
        ids = torch.full((B, T), pad, dtype=torch.long)
        for r, x in enumerate(seqs):  # right padding: causal, so the padding never reaches real positions
            ids[r, :len(x)] = torch.tensor(x)
        kw = {}
        if P:
            kw = dict(cache=cache, use_cache=True, attention_mask=torch.ones((B, P + T), dtype=torch.long, device=dev),
                      position_ids=(P + torch.arange(T, device=dev))[None, :].repeat(B, 1))
        pred = sc.forward(model, ids.to(dev), **kw).logits.argmax(-1).cpu()  # (B, T): [t] predicts token P + t + 1
        for r, j in enumerate(batch):
            g = self.gen[j]
            p, tgt = len(prompts[r]) - P, g["target"]
            guess = pred[r, p - 1:p + len(tgt)].tolist()  # greedy choice after prompt + target[:k], k = 0..n
            k = next((k for k in range(len(tgt)) if guess[k] != tgt[k]), len(tgt))
            if k == len(tgt):  # greedy reproduced the target; does it stop here?
                if len(tgt) >= g["max_gen"]:
                    decided[j] = True
                    continue
                toks = tgt + [guess[len(tgt)]]
            else:
                toks = tgt[:k] + [guess[k]]
            final = self._final_text(model, g, toks)
            if final is not None:
                decided[j] = final == g["gold"]
            elif not self._can_still_match(g, sc.decode(toks)):
                decided[j] = False
            # else undecided: decoded greedily below

    def _greedy(self, model, batch: list[int], decided: list) -> None:
        sc, tok, dev = self.scorer, self.scorer.tokenizer, model_device(model)
        gs = [self.gen[j] for j in batch]
        window = sc.window(model)
        prompts = [self._prompt(model, g, window) for g in gs]
        pad = sc.pad_token_id
        T = max(len(x) for x in prompts)
        ids = torch.full((len(gs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(gs), T), dtype=torch.long)
        for r, x in enumerate(prompts):  # left padding, as lm-eval's generation
            ids[r, T - len(x):] = torch.tensor(x)
            mask[r, T - len(x):] = 1
        dropped: set[int] = set()

        def keep(r: int, toks: list[int]) -> bool:
            if len(toks) >= gs[r]["max_gen"]:
                return False  # this row's budget is spent (a batch may mix budgets); judged below
            if self._can_still_match(gs[r], tok.decode(toks, skip_special_tokens=True)):
                return True
            dropped.add(r)
            return False

        max_new = max(g["max_gen"] for g in gs)
        outs = sc.greedy_generate(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new, stop=gs[0]["until"],
                                  keep=keep) if len({tuple(g["until"]) for g in gs}) == 1 else None
        if outs is None:  # mixed stop strings in one batch: decode one by one
            for j in batch:
                self._greedy(model, [j], decided)
            return
        for r, (j, g, toks) in enumerate(zip(batch, gs, outs, strict=True)):
            if r in dropped:
                decided[j] = False
            else:
                toks = toks[:g["max_gen"]]
                decided[j] = self._cut(g, tok.decode(toks, skip_special_tokens=True)) == g["gold"]
