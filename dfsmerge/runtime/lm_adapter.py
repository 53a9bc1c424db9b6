"""lm-eval adapter over any Hugging Face-like causal LM (a vanilla ``AutoModelForCausalLM`` or the runtime's
``StitchedModel``), so that every lm-eval task, built-in or a custom YAML over local JSONL, is an objective.

The adapter reproduces the numbers of lm-eval's own ``HFLM`` (``lm_eval/models/huggingface.py``, 0.4.x) on a
vanilla model: the same tokenisation of context + continuation (``TemplateLM._encode_pair``), the same BOS/prefix
token rules, the same left truncation to ``max_length``, the same request ordering and batching (lm-eval's
``Collator``, longest first, one-token-continuation logits reuse), the same right padding for scoring and left
padding for generation, and the same ``until`` / ``max_gen_toks`` handling. Generation is a greedy loop over the
model's ``forward`` with a KV cache (positions from the attention mask, as ``transformers``' ``generate``), so the
model needs only ``forward(input_ids, attention_mask=, position_ids=, cache=, use_cache=)`` returning an
object with ``.logits`` (and ``.cache`` when ``use_cache``).

Model interface expected:
    ``model(input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False)``
    -> output with ``.logits`` of shape (B, T, V) and, when ``use_cache``, ``.cache``;
    ``model.config`` (for ``max_position_embeddings``), ``model.device``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.models.utils_hf import pad_and_concat

from dfsmerge.errors import ConfigError

#: lm-eval's default ``max_gen_toks`` (``HFLM.max_gen_toks``).
DEFAULT_MAX_GEN_TOKS = 256


#: generation kwargs that do not change greedy decoding (sampling knobs are ignored when do_sample is false).
_GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks", "max_new_tokens",
                   "max_tokens", "max_completion_tokens"}


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


class DfsLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` over an in-memory HF-like causal LM and its tokenizer.

    Args:
        model: the model (``nn.Module`` with the interface in the module docstring). It is used as is; the adapter
            never copies, moves or re-initialises it, so swapping the runtime's candidate is seen at once.
        tokenizer: a ``transformers`` tokenizer. As ``HFLM``, a missing pad token is set (unk, else eos).
        batch_size: requests per forward pass (``HFLM``'s ``batch_size``; "auto" is not supported).
        max_length: context window; default from ``config.max_position_embeddings`` as ``HFLM``.
        max_gen_toks: default generation budget when a task gives none (``HFLM``: 256).
        add_bos_token: as ``HFLM``'s ``add_bos_token`` (None: the tokenizer's own default).
        prefix_token_id: token conditioning empty contexts and rolling windows (default BOS, else EOS).
        logits_cache: reuse logits across one-token continuations of the same context (``HFLM`` default True).
        progress: show lm-eval's per-call progress bars (off: a search calls the adapter thousands of times).

    Raises:
        ConfigError: on a non-positive ``batch_size``.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, logits_cache: bool = True, progress: bool = False) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is not a positive integer; use e.g. batch_size=8")
        self.model = model
        self.tokenizer = configure_pad_token(tokenizer, model_config=getattr(model, "config", None))
        self.batch_size = batch_size
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_cache = logits_cache
        self.progress = progress
        self.forward_calls = 0  # model forward passes issued (prefill and decode steps alike)

    # ---- properties lm-eval reads -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        if dev is None:
            dev = next(self.model.parameters()).device
        return torch.device(dev)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(getattr(self.model, "config", None), self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    # ---- tokenisation (HFLM.tok_encode / tok_batch_encode semantics) --------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            enc = enc[-left_truncate_len:]
        return enc

    def tok_batch_encode(self, strings: list[str], *, left_truncate_len: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        special: dict[str, bool] = {}
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        try:
            enc = self.tokenizer(strings, truncation=False, padding="longest", return_tensors="pt", **special)
        finally:
            self.tokenizer.padding_side = old_side
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T) each, left-padded
        if left_truncate_len and ids.shape[1] > left_truncate_len:
            ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
        return ids, mask

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- model calls -------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, **kwargs):
        self.forward_calls += 1
        with torch.no_grad():
            return self.model(input_ids=input_ids, **kwargs)

    def encode_loglikelihood_requests(self, args: Sequence[tuple[str, str]]
                                      ) -> list[tuple[tuple[str, str], list[int], list[int]]]:
        """Tokenise (context, continuation) pairs exactly as ``TemplateLM.loglikelihood`` does."""
        out = []
        for context, continuation in args:
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx_enc, cont_enc = (([self.prefix_token_id], cont) if self.prefix_token_id != cont[0]
                                     else (cont[:1], cont[1:]))
            else:
                ctx_enc, cont_enc = self._encode_pair(context, continuation)
            out.append(((context, continuation), ctx_enc, cont_enc))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``TemplateLM.loglikelihood`` (tokenise, then :meth:`_loglikelihood_tokens`), quiet unless ``progress``."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    # ---- loglikelihood -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        """Score continuations exactly as ``HFLM._loglikelihood_tokens`` (causal backend)."""
        res: list[tuple[float, bool]] = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        dev = self.device
        for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
            inps, inplens, conts = [], [], []
            for _, ctx_enc, cont_enc in chunk:
                if not ctx_enc or not cont_enc or len(cont_enc) > self.max_length:
                    raise ConfigError(
                        f"request with context of {len(ctx_enc)} and continuation of {len(cont_enc)} tokens "
                        f"cannot be scored (max_length={self.max_length}); check the task's doc_to_target/"
                        "doc_to_choice produce non-empty text")
                # left-truncate to max_length + 1 tokens, then drop the last (its logit predicts nothing)
                inp = torch.tensor((ctx_enc + cont_enc)[-(self.max_length + 1):][:-1], dtype=torch.long, device=dev)
                inps.append(inp)
                inplens.append(inp.shape[0])
                conts.append(cont_enc)
            padlen = max(inplens)
            batched = pad_and_concat(padlen, inps, padding_side="right")  # (B, padlen)
            logprobs = F.log_softmax(self._forward(batched).logits, dim=-1)  # (B, padlen, V)
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
                    if req_str_ is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str_, answer)
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of token loglikelihoods over rolling windows, as ``HFLM.loglikelihood_rolling``."""
        windows: list[tuple[int, tuple]] = []
        counts: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            ws = [(None, *lm_utils.make_disjoint_window(w)) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((i, w) for w in ws)
            counts.append(len(ws))
        nlls: list[float] = []
        for s in range(0, len(windows), self.batch_size):
            batch = [w for _, w in windows[s:s + self.batch_size]]
            nlls.extend(ll for ll, _ in self._loglikelihood_tokens(batch, override_bs=len(batch)))
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
        re_ords = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = copy.deepcopy(all_kwargs[0])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = self._pop_max_gen_toks(kwargs)
            self._check_greedy(kwargs)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks={max_gen} is not below the model's max_length={self.max_length}; "
                                  "lower the task's generation_kwargs.max_gen_toks")
            ids, mask = self.tok_batch_encode(list(contexts), left_truncate_len=max_ctx)
            gen = self.greedy_generate(ids.to(self.device), mask.to(self.device), max_new_tokens=max_gen, stop=until)
            for toks in gen:
                res.append(postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None))
            for ctx, kw, s in zip(contexts, all_kwargs, res[-len(contexts):], strict=True):
                self.cache_hook.add_partial("generate_until", (ctx, kw), s)
        return re_ords.get_original(res)

    def _pop_max_gen_toks(self, kwargs: dict) -> int:
        """The generation budget, with lm-eval's alias priority; removes every alias from ``kwargs``."""
        keys = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
        value = next((int(kwargs[k]) for k in keys if kwargs.get(k) is not None), self.max_gen_toks)
        for k in keys:
            kwargs.pop(k, None)
        return value

    @staticmethod
    def _check_greedy(kwargs: dict) -> None:
        check_generation_kwargs(kwargs)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_cfg = getattr(self.model, "generation_config", None)
        cfg_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if cfg_eos is None:
            cfg_eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif cfg_eos:
            ids.update(int(e) for e in cfg_eos)
        ids.discard(None)
        return ids

    def greedy_generate(self, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int,
                        stop: Sequence[str] = (), keep=None) -> list[list[int]]:
        """Greedy decoding of a left-padded batch with a KV cache; positions follow ``transformers.generate``.

        A row is finished at an EOS token or once its decoded text (special tokens kept, as lm-eval's stopping
        criteria see it) contains a stop string; finished rows are fed the pad token, which cannot change other
        rows. Decoding stops when every row is finished or after ``max_new_tokens`` tokens.

        Args:
            ids: (B, T) left-padded prompt tokens. mask: (B, T) 1 for real tokens.
            max_new_tokens: generation budget per row.
            stop: stop strings (lm-eval's ``until`` incl. the EOS string).
            keep: optional ``keep(row, tokens) -> bool``; a row for which it returns False is finished early (the
                native evaluator drops rows that can no longer match their target).

        Returns:
            Per row the generated token ids (EOS included, pads after a finish excluded).
        """
        B = ids.shape[0]
        eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mask = mask.long()
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T), as generate's position ids
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        cache = None
        inp, inp_pos = ids, pos
        for _ in range(max_new_tokens):
            o = self._forward(inp, attention_mask=mask, position_ids=inp_pos, cache=cache, use_cache=True)
            cache = o.cache
            nxt = o.logits[:, -1, :].argmax(dim=-1)  # (B,)
            nxt_list = nxt.tolist()
            for b in range(B):
                if done[b]:
                    nxt_list[b] = pad
                    continue
                tok = nxt_list[b]
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
            inp = torch.tensor(nxt_list, dtype=torch.long, device=ids.device).unsqueeze(1)  # (B, 1)
            inp_pos = inp_pos[:, -1:] + 1  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, T + k)
        return out
