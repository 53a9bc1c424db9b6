"""The scoring interface over any Hugging Face-like causal LM (a vanilla ``AutoModelForCausalLM`` or the runtime's
``StitchedModel``), and the lm-eval adapter built on it, so that every lm-eval task, built-in or a custom YAML over
local JSONL, is an objective.

:class:`Scorer` is the public interface both the adapter (:class:`DfsLM`) and the native evaluator
(:mod:`dfsmerge.objectives.native`) use: tokenise (:meth:`Scorer.encode`, :meth:`Scorer.encode_batch`,
:meth:`Scorer.encode_requests`), forward (:meth:`Scorer.forward`), score continuations (:meth:`Scorer.score`) and
greedy decode (:meth:`Scorer.greedy_generate`). It holds the tokenizer and the settings; the model is an argument of
every call that runs it, so one scorer serves every candidate of a search.

The numbers are those of lm-eval's own ``HFLM`` (``lm_eval/models/huggingface.py``, 0.4.x) on a vanilla model: the
same tokenisation of context + continuation (``TemplateLM._encode_pair``), the same BOS/prefix token rules, the same
left truncation to ``max_length``, the same request ordering and batching (lm-eval's ``Collator``, longest first,
one-token-continuation logits reuse), the same right padding for scoring and left padding for generation, and the
same ``until`` / ``max_gen_toks`` handling. Generation is a greedy loop over the model's ``forward`` with a KV cache
(positions from the attention mask, as ``transformers``' ``generate``). lm-eval's helpers come from
:mod:`dfsmerge.objectives.lm_eval_compat`, the one module that touches lm-eval.

Model interface expected:
    ``model(input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0)``
    -> output with ``.logits`` of shape (B, T, V) and, when ``use_cache``, ``.cache``;
    ``model.config`` (for ``max_position_embeddings``), ``model.device``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.lm_eval_compat import (
    Collator,
    TemplateLM,
    configure_pad_token,
    get_rolling_token_windows,
    handle_stop_sequences,
    has_bos_prefix,
    make_disjoint_window,
    pad_and_concat,
    postprocess_generated_text,
    resolve_max_length,
    special_tokens_kwargs,
)

#: lm-eval's default ``max_gen_toks`` (``HFLM.max_gen_toks``).
DEFAULT_MAX_GEN_TOKS = 256

#: generation kwargs that do not change greedy decoding (sampling knobs are ignored when do_sample is false).
_GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks", "max_new_tokens",
                   "max_tokens", "max_completion_tokens"}
#: the generation budget's aliases, in lm-eval's priority order.
_MAX_GEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

#: a tokenised loglikelihood request: ``((context, continuation) or None, context tokens, continuation tokens)``.
Request = tuple[Any, list[int], list[int]]


def check_generation_kwargs(kwargs: dict, *, task: str | None = None) -> None:
    """Raise unless ``kwargs`` (a task's ``generation_kwargs``) mean plain greedy decoding.

    Sampling follows lm-eval's rule (``do_sample: true``, or no ``do_sample`` and a temperature > 0); any other
    option that would change a greedy decode in ``transformers.generate`` (``repetition_penalty``,
    ``num_beams``, ...) is refused rather than silently ignored.

    Raises:
        ConfigError: naming the option and the fix.
    """
    where = f"task {task!r}: " if task else ""
    temp = kwargs.get("temperature", 0.0)
    if kwargs.get("do_sample") or (temp not in (None, 0, 0.0) and kwargs.get("do_sample") is not False):
        raise ConfigError(
            f"{where}generation_kwargs={kwargs!r} asks for sampling (do_sample/temperature); the dfsmerge adapter "
            "decodes greedily only (a search must be deterministic); set do_sample: false and temperature: 0")
    other = sorted(set(kwargs) - _GREEDY_NEUTRAL)
    if other:
        raise ConfigError(f"{where}generation_kwargs option(s) {', '.join(other)} are not supported by the dfsmerge "
                          "adapter (it decodes greedily with until/max_gen_toks only); remove them from the task "
                          "YAML")


def model_device(model) -> torch.device:
    """The device of ``model`` (its ``device`` attribute, else its first parameter's)."""
    dev = getattr(model, "device", None)
    if dev is None:
        dev = next(model.parameters()).device
    return torch.device(dev)


class Scorer:
    """Tokenise, forward, score continuations and decode greedily, exactly as lm-eval's ``HFLM``.

    Args:
        tokenizer: a ``transformers`` tokenizer. As ``HFLM``, a missing pad token is set (unk, else eos).
        model_config: the models' config, read only to choose that pad token (``HFLM``'s rule).
        batch_size: requests per forward pass (``HFLM``'s ``batch_size``).
        max_length: context window; default per model from ``config.max_position_embeddings`` (:meth:`window`).
        max_gen_toks: default generation budget when a task gives none (``HFLM``: 256).
        add_bos_token: as ``HFLM``'s ``add_bos_token`` (None: the tokenizer's own default).
        prefix_token_id: token conditioning empty contexts and rolling windows (default BOS, else EOS).
        logits_cache: reuse logits across one-token continuations of the same context (``HFLM`` default True).
        compact_batches: greedy decoding drops a finished row from the batch (and its KV cache) instead of feeding
            it pads until the longest row ends, as ``transformers.generate`` does: the cost follows the sum of the
            rows' lengths, not batch x longest (about 2x less on worked answers of 50-400 tokens). The other rows'
            tokens are the same up to float rounding of a smaller matrix product (a greedy tie can break
            differently), so it is off by default where equality with ``HFLM`` is the point.

    Attributes:
        forward_calls: model forward passes issued so far (prefill and decode steps alike).

    Raises:
        ConfigError: on a non-positive ``batch_size``.
    """

    def __init__(self, tokenizer, *, model_config=None, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, logits_cache: bool = True,
                 compact_batches: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is not a positive integer; use e.g. batch_size=8")
        self.tokenizer = configure_pad_token(tokenizer, model_config=model_config)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_cache = logits_cache
        self.compact_batches = compact_batches
        self.forward_calls = 0

    # ---- tokenisation (HFLM.tok_encode / tok_batch_encode / TemplateLM._encode_pair semantics) -------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    def encode(self, text: str, *, add_special_tokens: bool | None = None,
               left_truncate_len: int | None = None) -> list[int]:
        """Token ids of ``text`` (``HFLM.tok_encode``)."""
        special = special_tokens_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(text, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(text, **special)
        if left_truncate_len:
            enc = enc[-left_truncate_len:]
        return enc

    def encode_batch(self, texts: list[str], *, left_truncate_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(ids, mask)``, each (B, T), as ``HFLM.tok_batch_encode``."""
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        special: dict[str, bool] = {}
        if has_bos_prefix(texts[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        try:
            enc = self.tokenizer(texts, truncation=False, padding="longest", return_tensors="pt", **special)
        finally:
            self.tokenizer.padding_side = old_side
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T) each, left-padded
        if left_truncate_len and ids.shape[1] > left_truncate_len:
            ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
        return ids, mask

    def decode(self, tokens, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A chat rendered by the tokenizer's template, as ``HFLM.apply_chat_template`` renders it (a template that
        rejects the system role gets the chat without its system messages)."""
        import jinja2

        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kw)
        except jinja2.exceptions.TemplateError:
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kw)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context tokens, continuation tokens)`` as ``TemplateLM.loglikelihood`` tokenises a request: an empty
        context becomes the prefix token; trailing spaces of the context move to the continuation; the whole text
        is encoded and split after the context's tokens."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def encode_requests(self, pairs: Sequence[tuple[str, str]]) -> list[Request]:
        """Tokenise (context, continuation) pairs into :data:`Request` s (see :meth:`encode_pair`)."""
        return [((c, x), *self.encode_pair(c, x)) for c, x in pairs]

    def generation_settings(self, gen_kwargs: dict, *, task: str | None = None) -> tuple[list[str], int]:
        """``(stop strings, budget)`` of a task's generation kwargs, as ``HFLM.generate_until`` reads them (the EOS
        string is a stop string; the budget's aliases in lm-eval's priority).

        Raises:
            ConfigError: the kwargs ask for anything but greedy decoding (:func:`check_generation_kwargs`).
        """
        kwargs = copy.deepcopy(dict(gen_kwargs))
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.decode(self.eot_token_id, skip_special_tokens=False))
        max_gen = next((int(kwargs[k]) for k in _MAX_GEN_KEYS if kwargs.get(k) is not None), self.max_gen_toks)
        for k in _MAX_GEN_KEYS:
            kwargs.pop(k, None)
        check_generation_kwargs(kwargs, task=task)
        return until, max_gen

    # ---- model calls -------------------------------------------------------------------------------
    def window(self, model) -> int:
        """The context window for ``model``: ``max_length`` if set, else ``HFLM``'s rule from its config."""
        if self.max_length:
            return self.max_length
        return resolve_max_length(getattr(model, "config", None), self.tokenizer)

    def eos_ids(self, model) -> set[int]:
        """Token ids that end a generation: the tokenizer's EOS and the model's generation/config ``eos_token_id``."""
        ids = {self.tokenizer.eos_token_id}
        gen_cfg = getattr(model, "generation_config", None)
        cfg_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if cfg_eos is None:
            cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif cfg_eos:
            ids.update(int(e) for e in cfg_eos)
        ids.discard(None)
        return ids

    def forward(self, model, input_ids: torch.Tensor, **kwargs):
        """``model(input_ids, **kwargs)`` without gradients, counted in :attr:`forward_calls`."""
        self.forward_calls += 1
        with torch.no_grad():
            return model(input_ids=input_ids, **kwargs)

    def score(self, model, requests: Sequence[Request], *, batch_size: int | None = None,
              on_result: Callable[[Any, tuple[float, bool]], None] | None = None) -> list[tuple[float, bool]]:
        """``(loglikelihood, is greedy)`` of each request's continuation, exactly as
        ``HFLM._loglikelihood_tokens`` (causal backend).

        Args:
            model: the model to score with.
            requests: tokenised requests (:meth:`encode_requests`).
            batch_size: rows per forward pass (default :attr:`batch_size`).
            on_result: called with ``(request's strings, answer)`` for every answer (lm-eval's cache hook).

        Raises:
            ConfigError: a request with an empty context or continuation, or a continuation longer than the window.
        """
        res: list[tuple[float, bool]] = []
        max_len = self.window(model)

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        dev = model_device(model)
        for chunk in re_ord.get_batched(n=batch_size or self.batch_size):
            inps, inplens, conts = [], [], []
            for _, ctx_enc, cont_enc in chunk:
                if not ctx_enc or not cont_enc or len(cont_enc) > max_len:
                    raise ConfigError(
                        f"request with context of {len(ctx_enc)} and continuation of {len(cont_enc)} tokens "
                        f"cannot be scored (max_length={max_len}); check the task's doc_to_target/"
                        "doc_to_choice produce non-empty text")
                # left-truncate to max_length + 1 tokens, then drop the last (its logit predicts nothing)
                inp = torch.tensor((ctx_enc + cont_enc)[-(max_len + 1):][:-1], dtype=torch.long, device=dev)
                inps.append(inp)
                inplens.append(inp.shape[0])
                conts.append(cont_enc)
            padlen = max(inplens)
            batched = pad_and_concat(padlen, inps, padding_side="right")  # (B, padlen)
            logprobs = F.log_softmax(self.forward(model, batched).logits, dim=-1)  # (B, padlen, V)
            for (req_str, ctx_toks, _), lp, inplen, cont_toks in zip(chunk, logprobs, inplens, conts, strict=True):
                contlen = len(cont_toks)
                ctx_len = inplen + (lp.shape[0] - padlen)
                lp = lp[ctx_len - contlen:ctx_len].unsqueeze(0)  # (1, contlen, V)
                greedy = lp.argmax(dim=-1)  # (1, contlen)
                for req_str_, cont_toks_, lp_ in re_ord.get_cache(req_str=req_str, cxt_toks=ctx_toks,
                                                                   cont_toks=cont_toks, logits=lp):
                    cont_t = torch.tensor(cont_toks_, dtype=torch.long, device=dev).unsqueeze(0)  # (1, c)
                    is_greedy = bool((greedy[:, -cont_t.shape[1]:] == cont_t).all())
                    ll = torch.gather(lp_, 2, cont_t.unsqueeze(-1)).squeeze(-1)  # (1, c)
                    answer = (float(ll.sum()), is_greedy)
                    res.append(answer)
                    if req_str_ is not None and on_result is not None:
                        on_result(req_str_, answer)
        return re_ord.get_original(res)

    def rolling_windows(self, text: str, model) -> list[Request]:
        """The disjoint scoring windows of ``text`` for a rolling loglikelihood (``HFLM.loglikelihood_rolling``)."""
        return [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.window(model),
            context_len=1)]

    def greedy_generate(self, model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int,
                        stop: Sequence[str] = (), keep=None) -> list[list[int]]:
        """Greedy decoding of a left-padded batch with a KV cache; positions follow ``transformers.generate``.

        A row is finished at an EOS token or once its decoded text (special tokens kept, as lm-eval's stopping
        criteria see it) contains a stop string; finished rows are fed the pad token, which cannot change other
        rows. Decoding stops when every row is finished or after ``max_new_tokens`` tokens.

        Args:
            model: the model to decode with.
            ids: (B, T) left-padded prompt tokens. mask: (B, T) 1 for real tokens.
            max_new_tokens: generation budget per row.
            stop: stop strings (lm-eval's ``until`` incl. the EOS string).
            keep: optional ``keep(row, tokens) -> bool``; a row for which it returns False is finished early (the
                native evaluator drops rows that can no longer match their target).

        Returns:
            Per row the generated token ids (EOS included, pads after a finish excluded).
        """
        B = ids.shape[0]
        eos_ids = self.eos_ids(model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mask = mask.long()
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T), as generate's position ids
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        rows = list(range(B))  # the batch's rows, as rows of ``out`` (fewer once finished rows are dropped)
        cache = None
        inp, inp_pos = ids, pos
        for _ in range(max_new_tokens):
            o = self.forward(model, inp, attention_mask=mask, position_ids=inp_pos, cache=cache, use_cache=True,
                             logits_to_keep=1)  # the prompt's other positions' logits are never read
            cache = o.cache
            nxt_list = o.logits[:, -1, :].argmax(dim=-1).tolist()  # (len(rows),)
            for j, b in enumerate(rows):
                if done[b]:
                    nxt_list[j] = pad
                    continue
                tok = nxt_list[j]
                out[b].append(tok)
                if tok in eos_ids:
                    done[b] = True
                elif stop:
                    text = self.tokenizer.decode(out[b], skip_special_tokens=False)
                    done[b] = any(s and s in text for s in stop)
                if not done[b] and keep is not None and not keep(b, out[b]):
                    done[b] = True
            if all(done):
                break
            inp = torch.tensor(nxt_list, dtype=torch.long, device=ids.device).unsqueeze(1)  # (R, 1)
            inp_pos = inp_pos[:, -1:] + 1  # (R, 1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (R, T + k)
            live = [j for j, b in enumerate(rows) if not done[b]]
            if self.compact_batches and len(live) < len(rows):
                index = torch.tensor(live, dtype=torch.long, device=ids.device)
                select = getattr(cache, "batch_select_indices", None)
                if select is not None:
                    select(index)
                    inp, inp_pos, mask = inp[index], inp_pos[index], mask[index]
                    rows = [rows[j] for j in live]
        return out


class DfsLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` over an in-memory HF-like causal LM and its tokenizer (a :class:`Scorer` bound to
    one model).

    Args:
        model: the model (``nn.Module`` with the interface in the module docstring). It is used as is; the adapter
            never copies, moves or re-initialises it.
        tokenizer: a ``transformers`` tokenizer.
        batch_size, max_length, max_gen_toks, add_bos_token, prefix_token_id, logits_cache, compact_batches: see
            :class:`Scorer`.
        progress: show lm-eval's per-call progress bars (off: a search calls the adapter thousands of times).
        scorer: an existing :class:`Scorer` to use (shares its settings and forward count); the other settings are
            then ignored.

    Raises:
        ConfigError: on a non-positive ``batch_size``.
    """

    def __init__(self, model, tokenizer=None, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, logits_cache: bool = True, progress: bool = False,
                 scorer: Scorer | None = None, compact_batches: bool = False) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer if scorer is not None else Scorer(
            tokenizer, model_config=getattr(model, "config", None), batch_size=batch_size, max_length=max_length,
            max_gen_toks=max_gen_toks, add_bos_token=add_bos_token, prefix_token_id=prefix_token_id,
            logits_cache=logits_cache, compact_batches=compact_batches)
        self.progress = progress

    # ---- properties lm-eval reads -------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.scorer.tokenizer

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def forward_calls(self) -> int:
        return self.scorer.forward_calls

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def eot_token_id(self) -> int:
        return self.scorer.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.window(self.model)

    @property
    def max_gen_toks(self) -> int:
        return self.scorer.max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    # ---- tokenisation ------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        return self.scorer.encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len)

    def tok_batch_encode(self, strings: list[str], *, left_truncate_len: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer.encode_batch(strings, left_truncate_len=left_truncate_len)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.scorer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.scorer.apply_chat_template(chat_history, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's template (``simple_evaluate`` records it); None when disabled."""
        if not chat_template:
            return None
        t = getattr(self.tokenizer, "chat_template", None)
        if isinstance(t, dict):
            return t.get(chat_template if isinstance(chat_template, str) else "default")
        return t

    # ---- loglikelihood -----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Tokenise each ``(context, continuation)`` (:meth:`Scorer.encode_requests`) and score it."""
        return self._loglikelihood_tokens(self.scorer.encode_requests([req.args for req in requests]))

    def _loglikelihood_tokens(self, requests: Sequence[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """lm-eval's hook for scoring tokenised requests: :meth:`Scorer.score`."""
        return self.scorer.score(self.model, requests, batch_size=override_bs,
                                 on_result=lambda req, ans: self.cache_hook.add_partial("loglikelihood", req, ans))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of token loglikelihoods over rolling windows, as ``HFLM.loglikelihood_rolling``."""
        windows: list[tuple[int, Request]] = []
        counts: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            ws = self.scorer.rolling_windows(string, self.model)
            windows.extend((i, w) for w in ws)
            counts.append(len(ws))
        nlls: list[float] = []
        bs = self.batch_size
        for s in range(0, len(windows), bs):
            batch = [w for _, w in windows[s:s + bs]]
            nlls.extend(ll for ll, _ in self.scorer.score(self.model, batch, batch_size=len(batch)))
        out, pos = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(nlls[pos:pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation with ``until`` stop strings and ``max_gen_toks``, as ``HFLM.generate_until``.

        Raises:
            ConfigError: when a task asks for sampling (``do_sample: true`` or a temperature > 0), which a
                search must not do (it would consume and perturb RNG state).
        """
        res: list[str] = []
        sc = self.scorer
        re_ords = Collator([req.args for req in requests], sort_fn=lambda r: (-len(sc.encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            until, max_gen = sc.generation_settings(all_kwargs[0])
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks={max_gen} is not below the model's max_length={self.max_length}; "
                                  "lower the task's generation_kwargs.max_gen_toks")
            ids, mask = sc.encode_batch(list(contexts), left_truncate_len=max_ctx)
            dev = self.device
            gen = sc.greedy_generate(self.model, ids.to(dev), mask.to(dev), max_new_tokens=max_gen, stop=until)
            for toks in gen:
                res.append(postprocess_generated_text(sc.decode(toks), stop=until, think_end_token=None))
            for ctx, kw, s in zip(contexts, all_kwargs, res[-len(contexts):], strict=True):
                self.cache_hook.add_partial("generate_until", (ctx, kw), s)
        return re_ords.get_original(res)
