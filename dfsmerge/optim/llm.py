"""LLM-guided evolution strategy (optimizer ``llm``): a language model proposes each generation's search mean.

R. T. Lange, Y. Tian and Y. Tang, "Large Language Models As Evolution Strategies", arXiv:2402.18381, 2024
("EvoLLM"): the LLM reads the best solutions so far, discretised and sorted from worst to best, and proposes the
next mean (an in-context recombination operator). LLM-Evo-Merge (kwon13/LLM-Evo-Merge, after mergekit-evolve) uses
it for model merging and samples offspring around the proposed mean with a small step ``sigma_low`` after an
improvement and a large one ``sigma_high`` when fitness stalls.

Generation g (values to minimise, as every dfsmerge optimizer)::

    g = 0:  m = x0 (box centre without one), sigma = sigma_high, row 0 is x0 itself
    g >= 1: prompt = the top_k distinct solutions told so far, worst to best: genes rounded to ``digits``
                     decimals, f = round(F * fitness_scale) as integers (lower is better)
            m = clip(parse(LLM answer), lo, hi), or the elite's mean (mean of those top_k) when every attempt
                failed (HTTP error, timeout, refusal, unparseable answer: each logged, retried with backoff)
            sigma = sigma_low if generation g-1 lowered the best-so-far, else sigma_high   # LLM-Evo-Merge's rule
    X = clip(m + sigma * (hi - lo) * z),  z ~ N(0, I)   (the loop then rounds integer and snaps binary genes)

The local backend constrains its answer to exactly ``dim`` numbers by default (``constrain``; SmolLM2-135M answered
0 of 7 toy PS prompts in format unaided: it lists numbers past the last gene). The LLM sees only a box-bounded
vector, so PS, DFS (binary indicator genes shown as their lo/hi values), staged and joint genomes all work. Single
objective (a weighted sum of several).

Exact resume: every attempt (prompt messages, response or error) is appended to ``RUN/llm.jsonl`` and fsynced
before the answer is used, once the loop has called :meth:`LLMES.bind_run_dir`; the attempts of the pending
generation also travel in the optimizer state. A resumed run replays logged attempts (checking the prompt is the
same) instead of calling the LLM again, so it equals an uninterrupted run. The API key is read from the environment
variable ``api_key_env`` names, at call time, and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, Field

from dfsmerge.errors import CheckpointError, ConfigError
from dfsmerge.optim.base import Optimizer, OptimizerOptions, register_optimizer

log = logging.getLogger("dfsmerge.optim.llm")

LOG_NAME = "llm.jsonl"
MAX_BACKOFF_S = 30.0
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class LLMOptions(OptimizerOptions):
    """Options of ``optimizer: llm`` (LLM-Evo-Merge's names ``llm_model`` and ``api_key_env`` are accepted)."""

    backend: Literal["openai", "local"] = "openai"
    """``openai``: any OpenAI-compatible chat-completions endpoint; ``local``: a transformers causal LM with a chat
    template, run in-process."""
    model: str | None = Field(None, min_length=1, validation_alias=AliasChoices("model", "llm_model"))
    """Model name at the endpoint (e.g. ``gpt-4o-mini``), or for ``local`` a model directory / downloaded hub id."""
    base_url: str | None = None
    """Endpoint, e.g. ``http://localhost:8000/v1``; None: the OpenAI API (or ``OPENAI_BASE_URL``)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key; None for endpoints without keys."""
    timeout: float = Field(60.0, gt=0)
    """Seconds per request (openai backend)."""
    max_retries: int = Field(3, ge=0)
    """Further attempts per generation after a failed one (HTTP error, timeout, refusal, garbage)."""
    backoff: float = Field(1.0, ge=0)
    """Seconds before the first retry, doubled for each further one (at most 30 s)."""
    top_k: int = Field(8, ge=1)
    """Solutions shown to the LLM (the best distinct ones told so far); also the elite of the fallback mean."""
    sigma_low: float = Field(0.05, gt=0)
    """Sampling step after an improvement, as a fraction of each gene's range (LLM-Evo-Merge's --sigma-low)."""
    sigma_high: float = Field(0.2, gt=0)
    """Sampling step when the last generation did not improve (LLM-Evo-Merge's --sigma-high)."""
    digits: int = Field(3, ge=0, le=8)
    """Decimals of the genes shown in the prompt."""
    fitness_scale: float = Field(1000.0, gt=0)
    """Fitness is shown as the integer round(F * fitness_scale)."""
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=8)
    """Longest answer (tokens); a mean of D genes needs about 4 * D."""
    device: str = "cpu"
    """Device of the ``local`` backend (cpu, cuda, cuda:N, auto)."""
    prefill: str = '{"mean": ['
    """``local`` backend: the start of the answer, written after the chat template's generation prompt so the model
    continues with numbers (EvoLLM primes its LLM the same way); a 135M model rarely answers in format without it.
    Chat-completions endpoints cannot be prefilled."""
    constrain: bool = True
    """``local`` backend: grammar-constrained decoding after the prefill (which must end with ``[``): only tokens
    that keep the answer a list of exactly ``dim`` numbers (at most ``digits`` decimals, integer parts no longer than
    the bounds need) separated by ``", "`` and closed by ``]`` may be generated, then end of text. The model still
    picks every digit (argmax, or a sample, among the allowed tokens); it just cannot answer off format, as
    structured outputs on an endpoint would do. False: free generation, parsed as any answer."""

    api_key: Any = Field(None, exclude=True)
    """Refused (LLM-Evo-Merge's --api-key): a config is copied into the run directory, so keys live in the
    environment variable ``api_key_env`` names."""

    def preflight(self) -> None:
        """Check before the run starts that the LLM can be reached: the key's variable is set and the endpoint
        answers (openai), or the model and its chat template load (local).

        Raises:
            ConfigError: one line naming the option, the value and the fix.
        """
        if self.backend == "local":
            _local_model(self.model)
            return
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(f"optimizer 'llm' option api_key_env={self.api_key_env!r}: that environment variable "
                              f"is not set; export {self.api_key_env}=<your key>, or set api_key_env: null for an "
                              "endpoint without keys")
        import openai

        client = _openai_client(self, timeout=min(self.timeout, 10.0))
        try:
            listed = [m.id for m in client.models.list()]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise ConfigError(f"optimizer 'llm' option base_url={self.base_url!r} rejected the key in "
                              f"{self.api_key_env} (HTTP {e.status_code}); export a valid key") from None
        except openai.APIStatusError:
            return  # it answers; some compatible servers just lack /models
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise ConfigError(f"optimizer 'llm' option base_url={self.base_url!r} is unreachable "
                              f"({type(e).__name__}); start the server or fix base_url") from None
        if listed and self.model not in listed:
            log.warning("optimizer 'llm': model %r is not among the %d models the endpoint lists (e.g. %s)",
                        self.model, len(listed), ", ".join(listed[:5]))


def _openai_client(options: LLMOptions, *, timeout: float):
    from openai import OpenAI

    key = os.environ.get(options.api_key_env) if options.api_key_env else None
    # Retries are ours (each attempt logged); the client must not retry behind our back.
    return OpenAI(api_key=key or "unused", base_url=options.base_url, timeout=timeout, max_retries=0)


def _local_model(model: str):
    """(directory, tokenizer) of a ``local`` backend model: a directory, GGUF file, ``real:<name>`` or hub id."""
    from dfsmerge.io.reader import resolve_model_path
    from dfsmerge.io.tokenizer import load_tokenizer

    try:
        path = resolve_model_path(model)
        tok = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any load failure is the same user error
        raise ConfigError(f"optimizer 'llm' option model={model!r} (backend: local) does not load "
                          f"({type(e).__name__}); give a model directory, a GGUF file, real:smollm2-135m or a "
                          "downloaded hub id") from None
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"optimizer 'llm' option model={model!r} has no chat template; use an instruction-tuned "
                          "model (e.g. real:smollm2-135m, SmolLM2-135M-Instruct)")
    return path, tok


# ---- chat backends -----------------------------------------------------------------------------------------
class _OpenAIBackend:
    """Chat completions through the ``openai`` client; raises on HTTP errors, timeouts and empty answers."""

    def __init__(self, options: LLMOptions):
        self.options = options
        self._client = None

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str:
        if self._client is None:
            self._client = _openai_client(self.options, timeout=self.options.timeout)
        resp = self._client.chat.completions.create(model=self.options.model, messages=messages,
                                                    temperature=self.options.temperature,
                                                    max_tokens=self.options.max_tokens)
        msg = resp.choices[0].message if resp.choices else None
        if msg is None or not msg.content:
            refusal = getattr(msg, "refusal", None) if msg is not None else None
            raise RuntimeError(f"empty answer{f' (refusal: {refusal})' if refusal else ''}")
        return msg.content


class NumberListGrammar:
    """The constrained answer of the ``local`` backend, character by character: ``dim`` numbers
    ``-?D{1,int_digits}(.D{1,digits})?`` separated by ``", "``, then ``]``. A state is ``(numbers done, phase,
    digits in the current part)``; :meth:`step` returns the next state or None when the character is not allowed."""

    START = (0, "start", 0)

    def __init__(self, dim: int, digits: int, int_digits: int):
        self.dim, self.digits, self.int_digits = dim, digits, int_digits

    def step(self, state: tuple[int, str, int] | None, ch: str) -> tuple[int, str, int] | None:
        if state is None:
            return None
        n, phase, k = state
        if phase in ("start", "sign") and ch.isdigit():
            return (n, "int", 1)
        if phase == "start" and ch == "-":
            return (n, "sign", 0)
        if phase == "comma":
            return (n, "start", 0) if ch == " " else None
        if phase == "frac0":
            return (n, "frac", 1) if ch.isdigit() else None
        if phase in ("int", "frac"):
            if ch.isdigit():
                return (n, phase, k + 1) if k < (self.int_digits if phase == "int" else self.digits) else None
            if ch == "." and phase == "int" and self.digits > 0:
                return (n, "frac0", 0)
            if ch == "," and n + 1 < self.dim:
                return (n + 1, "comma", 0)
            if ch == "]" and n + 1 == self.dim:
                return (n + 1, "end", 0)
        return None

    def run(self, text: str, state: tuple[int, str, int] | None = START) -> tuple[int, str, int] | None:
        for ch in text:
            state = self.step(state, ch)
        return state

    @staticmethod
    def done(state: tuple[int, str, int] | None) -> bool:
        return state is not None and state[1] == "end"


class _GrammarLogits:
    """A transformers logits processor masking every token the grammar does not allow next (batch of one); after
    the closing bracket only end of text is allowed."""

    CHARS = frozenset("0123456789.-, ]")

    def __init__(self, grammar: NumberListGrammar, tok, prompt_len: int, pieces: dict[int, str]):
        self.grammar, self.prompt_len, self.pieces = grammar, prompt_len, pieces
        self.eos = tok.eos_token_id
        self._state: tuple[int, str, int] | None = grammar.START
        self._seen = prompt_len
        self._allowed: dict[tuple[int, str, int], list[int]] = {}

    @classmethod
    def pieces_of(cls, tok) -> dict[int, str]:
        """token id -> its text, for the tokens made only of the grammar's characters."""
        out = {}
        for i in range(len(tok)):
            text = tok.decode([i])
            if text and set(text) <= cls.CHARS:
                out[i] = text
        return out

    def __call__(self, input_ids, scores):
        import torch

        for t in input_ids[0, self._seen:].tolist():  # the tokens generated since the last call
            ok = t in self.pieces and not self.grammar.done(self._state)
            self._state = self.grammar.run(self.pieces[t], self._state) if ok else None
        self._seen = input_ids.shape[1]
        state = self._state
        if state is None or self.grammar.done(state):
            allowed = [self.eos]
        else:
            if state not in self._allowed:
                self._allowed[state] = [i for i, text in self.pieces.items()
                                        if self.grammar.run(text, state) is not None]
            allowed = self._allowed[state]
        mask = torch.full_like(scores, -math.inf)
        mask[:, allowed] = 0.0
        return scores + mask


class _LocalBackend:
    """A transformers causal LM run in-process with its chat template (greedy unless temperature > 0), its answer
    constrained to ``grammar`` when the options say so."""

    def __init__(self, options: LLMOptions, grammar: NumberListGrammar | None = None):
        self.options = options
        self.grammar = grammar if options.constrain else None
        self._model = self._tok = None
        self._pieces: dict[int, str] | None = None

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        device = self.options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path, self._tok = _local_model(self.options.model)
        self._model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str:
        import torch

        if self._model is None:
            self._load()
        tok, model = self._tok, self._model
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.options.prefill
        enc = tok(text, return_tensors="pt", add_special_tokens=False)  # the template wrote any special tokens
        enc = {k: v.to(model.device) for k, v in enc.items()}
        sample = self.options.temperature > 0
        kw: dict[str, Any] = {"do_sample": sample, "max_new_tokens": self.options.max_tokens}
        if sample:
            kw["temperature"] = self.options.temperature
        else:  # the model's generation_config may ask for sampling; greedy must not warn about its knobs
            kw.update(temperature=None, top_p=None, top_k=None)
        if tok.pad_token_id is None:
            kw["pad_token_id"] = tok.eos_token_id
        if self.grammar is not None:
            from transformers import LogitsProcessorList

            if self._pieces is None:
                self._pieces = _GrammarLogits.pieces_of(tok)
            kw["logits_processor"] = LogitsProcessorList(
                [_GrammarLogits(self.grammar, tok, enc["input_ids"].shape[1], self._pieces)])
        # The search checkpoints torch's global RNG: sampling must neither read nor advance it.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(**enc, **kw)  # (1, T_prompt + T_new)
        return self.options.prefill + tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_chat_backend(options: LLMOptions, grammar: NumberListGrammar | None = None):
    """The chat backend of ``options`` (``complete(messages, seed=...) -> str``, raising on failure); ``grammar``:
    the answer's format, enforced by the local backend when ``options.constrain``."""
    return _LocalBackend(options, grammar) if options.backend == "local" else _OpenAIBackend(options)


# ---- prompt and answer -------------------------------------------------------------------------------------
def _fmt(v: float, digits: int) -> str:
    return np.format_float_positional(round(float(v), digits), trim="-")


def describe_bounds(lo: np.ndarray, hi: np.ndarray, integer_mask: np.ndarray, binary_mask: np.ndarray,
                    digits: int) -> str:
    """``x1-x8 in [0, 1]; x9-x20 either -1 or 1`` (runs of consecutive genes of the same kind and bounds)."""

    def kind(j):
        a, b = _fmt(lo[j], digits), _fmt(hi[j], digits)
        if binary_mask[j]:
            return f"either {a} or {b}"
        return f"{'integers ' if integer_mask[j] else ''}in [{a}, {b}]"

    parts, start = [], 0
    for j in range(1, len(lo) + 1):
        if j == len(lo) or kind(j) != kind(start):
            name = f"x{start + 1}" if j - 1 == start else f"x{start + 1}-x{j}"
            parts.append(f"{name} {kind(start)}")
            start = j
    return "; ".join(parts)


def build_messages(*, dim: int, bounds_text: str, X: np.ndarray, F: np.ndarray, digits: int, fitness_scale: float,
                   generation: int) -> list[dict[str, str]]:
    """EvoLLM's prompt: the solutions ``X`` (k, dim) with fitness ``F`` (k,), listed worst to best.

    Returns:
        Chat messages (system, user).
    """
    order = np.argsort(-F, kind="stable")  # worst (largest F) first, best last
    lines = [f"x: [{', '.join(_fmt(v, digits) for v in X[i])}] f: {round(float(F[i]) * fitness_scale)}"
             for i in order]
    system = (f"You are the recombination step of an evolution strategy that minimises a black-box function of "
              f"{dim} variables. You are shown the best solutions found so far with their fitness f, sorted from "
              f"worst to best (lower f is better). Propose the next search mean: one point you expect to reach a "
              f"lower f than all of them. Answer with one JSON object {{\"mean\": [x1, ..., x{dim}]}} holding "
              f"{dim} numbers, and nothing else.")
    user = (f"Variables: {bounds_text}.\n" + "\n".join(lines)
            + f"\nGeneration {generation}: propose the next mean ({dim} numbers).")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _flatten(o: Any) -> list[Any]:
    if isinstance(o, list):
        return [v for item in o for v in _flatten(item)]
    return [o]


def parse_mean(text: str, dim: int) -> np.ndarray:
    """The proposed mean in an answer: a JSON object ``{"mean": [...]}`` (or ``x``/``mean_genome``), a JSON list,
    or else the last bracketed list of exactly ``dim`` numbers in the text.

    Raises:
        ValueError: no such list, or a non-finite number; the message says which.
    """
    body = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text.strip())
    cands: list[list[Any]] = []
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        obj = None
    if isinstance(obj, dict):
        for key in ("mean", "x", "mean_genome", "genome"):
            if isinstance(obj.get(key), list):
                cands.append(_flatten(obj[key]))
                break
    elif isinstance(obj, list):
        cands.append(_flatten(obj))
    for m in reversed(re.findall(r"\[[^\[\]]*\]", text)):
        cands.append(re.findall(_NUM, m))
    for c in cands:
        if len(c) == dim:
            try:
                x = np.array([float(v) for v in c], dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if not np.isfinite(x).all():
                raise ValueError("the proposed mean holds a non-finite number")
            return x
    raise ValueError(f"no list of {dim} numbers in the answer")


# ---- the log -----------------------------------------------------------------------------------------------
class _Log:
    """``RUN/llm.jsonl``: one JSON line per attempt and per proposal, appended and fsynced."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # killed mid-append: drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        out = []
        for n, line in enumerate(raw[:end].splitlines()):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{self.path}: line {n + 1} is not JSON ({e}); the log is corrupt") from e
        return out

    def append(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---- the optimizer -----------------------------------------------------------------------------------------
@register_optimizer("llm")
class LLMES(Optimizer):
    """EvoLLM with LLM-Evo-Merge's sigma rule (single objective); see the module docstring."""

    Options = LLMOptions
    multi_objective = False

    @classmethod
    def _validate_options(cls, options: LLMOptions) -> None:
        if options.model is None:
            raise ConfigError("optimizer 'llm' needs option model: the model name at the endpoint (e.g. "
                              "gpt-4o-mini), or a model directory with backend: local")
        if options.api_key is not None:
            raise ConfigError("optimizer 'llm' option api_key is refused: a config is copied into the run directory; "
                              "export the key in an environment variable and name it in api_key_env")
        env = options.api_key_env
        if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            raise ConfigError("optimizer 'llm' option api_key_env must be the NAME of an environment variable (e.g. "
                              "OPENAI_API_KEY), not the key itself; export the key in that variable")
        if options.backend == "local" and options.constrain and not options.prefill.endswith("["):
            raise ConfigError(f"optimizer 'llm' option prefill={options.prefill!r} must end with '[' when constrain "
                              "is true (the constrained answer is the list's numbers and its closing bracket); "
                              "end it with '[' or set constrain: false")
        if options.sigma_low > options.sigma_high:
            raise ConfigError(f"optimizer 'llm' option sigma_low={options.sigma_low} > sigma_high="
                              f"{options.sigma_high}; the step after an improvement must be the smaller one")

    def _setup(self) -> None:
        sp = self.space
        self._rng = np.random.Generator(np.random.PCG64(sp.seed))
        self._start = sp.x0.copy() if sp.x0 is not None else 0.5 * (sp.lo + sp.hi)  # (dim,)
        self._arch_x = np.zeros((0, sp.dim))  # (k, dim) the top_k distinct presented genomes told so far
        self._arch_f = np.zeros(0)  # (k,)
        self._best_f = math.inf
        self._improved = False
        self._bounds_text = describe_bounds(sp.lo, sp.hi, sp.integer_mask, sp.binary_mask, self.options.digits)
        self._stream = hashlib.sha256(json.dumps(sp.to_json(), sort_keys=True).encode()).hexdigest()[:16]
        self._backend = None
        self._log: _Log | None = None
        self._tape: dict[tuple[int, int], dict[str, Any]] = {}  # (generation, attempt) -> logged attempt
        self._logged_proposals: set[int] = set()
        self._calls: list[dict[str, Any]] = []  # attempts of the pending generation (saved with the state)
        self.last_proposal: dict[str, Any] | None = None

    def bind_run_dir(self, run_dir: str | Path) -> None:
        """Log to ``run_dir/llm.jsonl`` and replay the attempts already logged there for this search space."""
        path = Path(run_dir) / LOG_NAME
        if self._log is not None and self._log.path == path:
            return
        self._log = _Log(path)
        for rec in self._log.read():
            if rec.get("stream") != self._stream:
                continue
            if rec.get("kind") == "call":
                self._tape.setdefault((rec["generation"], rec["attempt"]), rec)
            elif rec.get("kind") == "proposal":
                self._logged_proposals.add(rec["generation"])

    # ---- ask/tell ----------------------------------------------------------------------------------------
    def _ask(self) -> np.ndarray:
        sp, o, g = self.space, self.options, self.generation
        if g == 0 or len(self._arch_f) == 0:
            mean, sigma, source, error = self._start, o.sigma_high, "start", None
        else:
            sigma = o.sigma_low if self._improved else o.sigma_high
            mean, error = self._propose(g)
            source = "llm" if error is None else "fallback"
            if mean is None:
                mean = self._arch_x.mean(axis=0)  # the elite's mean, (dim,)
                log.warning("llm: generation %d falls back to the elite's mean (%s)", g, error)
        z = self._rng.standard_normal((sp.popsize, sp.dim))  # (n, dim)
        X = np.clip(mean + sigma * (sp.hi - sp.lo) * z, sp.lo, sp.hi)  # (n, dim)
        if g == 0:
            X[0] = self._start
        self.last_proposal = {"generation": g, "source": source, "mean": mean.tolist(), "sigma": sigma,
                              "error": error}
        if self._log is not None and g not in self._logged_proposals:
            self._log.append({"stream": self._stream, "kind": "proposal", **self.last_proposal, "time": time.time()})
            self._logged_proposals.add(g)
        return X

    def _propose(self, g: int) -> tuple[np.ndarray | None, str | None]:
        """Ask the LLM (or replay its logged answers) for generation g's mean: (mean, None) or (None, last error)."""
        o, sp = self.options, self.space
        base = build_messages(dim=sp.dim, bounds_text=self._bounds_text, X=self._arch_x, F=self._arch_f,
                              digits=o.digits, fitness_scale=o.fitness_scale, generation=g)
        messages, error, live_before = base, None, False
        for attempt in range(o.max_retries + 1):
            rec = self._tape.pop((g, attempt), None)
            if rec is not None:
                if rec["messages"] != messages:
                    raise CheckpointError(f"{LOG_NAME}: the logged prompt of generation {g} attempt {attempt} differs "
                                          "from the resumed run's; the run directory is inconsistent, start a new run")
            else:
                if attempt and live_before:
                    time.sleep(min(o.backoff * 2 ** (attempt - 1), MAX_BACKOFF_S))
                rec = self._call(g, attempt, messages)
                live_before = True
            self._calls.append(rec)
            if rec["error"] is None:
                try:
                    return np.clip(parse_mean(rec["response"], sp.dim), sp.lo, sp.hi), None
                except ValueError as e:
                    error = f"unusable answer: {e}"
                    log.warning("llm: generation %d attempt %d: %s", g, attempt, error)
                    messages = [*base, {"role": "assistant", "content": rec["response"]},
                                {"role": "user", "content": f"That answer could not be used ({e}). Reply with only "
                                                            f"{{\"mean\": [...]}} holding {sp.dim} numbers."}]
            else:
                error = rec["error"]
                messages = base
        return None, error

    def _call(self, g: int, attempt: int, messages: list[dict[str, str]]) -> dict[str, Any]:
        if self._backend is None:
            sp = self.space
            bound = float(np.max(np.abs(np.concatenate([sp.lo, sp.hi]))))
            int_digits = len(str(math.ceil(bound))) if math.isfinite(bound) else 12
            self._backend = make_chat_backend(self.options, NumberListGrammar(sp.dim, self.options.digits, int_digits))
        t0 = time.perf_counter()
        seed = (self.space.seed * 1_000_003 + g * 101 + attempt) % 2**63  # a sampling local model's own stream
        try:
            response, error = self._backend.complete(messages, seed=seed), None
        except Exception as e:  # noqa: BLE001 - every fault of the LLM falls back; it never ends the search
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            response, error = None, f"{type(e).__name__}: {text}" if text else type(e).__name__
            log.warning("llm: generation %d attempt %d failed: %s", g, attempt, error)
        rec = {"stream": self._stream, "kind": "call", "generation": g, "attempt": attempt,
               "backend": self.options.backend, "model": self.options.model, "messages": messages,
               "response": response, "error": error, "seconds": round(time.perf_counter() - t0, 3),
               "time": time.time()}
        if self._log is not None:
            self._log.append(rec)  # durable before the answer is used
        return rec

    def _tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        Xp = self.space.present(X)  # (n, dim) what was evaluated
        f = F[:, 0]  # (n,)
        ok = f < self.options.penalty  # failed candidates were told as the penalty
        gen_best = float(f[ok].min()) if ok.any() else math.inf
        self._improved = gen_best < self._best_f
        self._best_f = min(self._best_f, gen_best)
        ax, af = list(self._arch_x), list(self._arch_f)
        for i in np.flatnonzero(ok):
            if not any(np.array_equal(Xp[i], a) for a in ax):
                ax.append(Xp[i])
                af.append(float(f[i]))
        order = np.argsort(af, kind="stable")[: self.options.top_k]
        self._arch_x = np.array([ax[i] for i in order]).reshape(-1, self.space.dim)
        self._arch_f = np.array([af[i] for i in order], dtype=np.float64)
        self._calls = []

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``, plus, mid-generation, the LLM attempts of the pending ask (so its replay
        on load uses them instead of calling the LLM again)."""
        d = super().state_dict()
        if self.pending:
            d["backend"] = {**d["backend"], "calls": [dict(c) for c in self._calls]}
        return d

    def _state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "archive_x": self._arch_x.tolist(),
                "archive_f": self._arch_f.tolist(), "best_f": None if math.isinf(self._best_f) else self._best_f,
                "improved": self._improved}

    def _load_state_dict(self, d: dict[str, Any]) -> None:
        self._rng.bit_generator.state = d["rng"]
        self._arch_x = np.asarray(d["archive_x"], dtype=np.float64).reshape(-1, self.space.dim)
        self._arch_f = np.asarray(d["archive_f"], dtype=np.float64)
        self._best_f = math.inf if d["best_f"] is None else float(d["best_f"])
        self._improved = bool(d["improved"])
        self._calls = []
        for c in d.get("calls", ()):
            self._tape[(c["generation"], c["attempt"])] = c
