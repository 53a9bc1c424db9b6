"""Real experts: a real base fine-tuned on CPU into a math expert and a language expert, as Layer Swapping
(Bandarkar et al., ICLR 2025, arXiv 2410.01335) and Sakana's evolutionary merging (arXiv 2403.13187) need them.

- **math expert**: English GSM-Symbolic instances, prompt ``Question: {q}\\nAnswer:`` and the worked answer as the
  target (loss on the answer and the closing EOS only);
- **language expert**: target-language *questions* of the same seen templates, language-modelled (loss on every
  token) -- target-language text with no worked solution in it.

Both are full fine-tunes at a small learning rate for about one epoch, so they stay near the base (the toy zoo's
lesson: experts far from their base do not merge). Training is deterministic for a seed and thread count, logs
progress, saves a resumable state every ``save_every`` steps (weights as safetensors, the optimizer's tensors read
back with ``weights_only=True``, data position and RNG in JSON) and writes each finished expert atomically as a
plain Hugging Face checkpoint with its base's tokenizer.

An expert set lives in ``$DFSMERGE_CACHE/real/experts/<set>/`` (``math/``, ``lang/``, ``tasks/``, ``log.txt``) and
is referenced as ``real:<set>/math``, ``real:<set>/lang`` (:mod:`dfsmerge.io.realmodels` resolves them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dfsmerge.errors import ConfigError
from dfsmerge.io.cache import building
from dfsmerge.io.realmodels import expert_set_dir
from dfsmerge.zoo.mgsm import PROMPT, TASKS_VERSION, MathDoc, SplitSpec, build_splits, write_jsonl, write_tasks

__all__ = ["EXPERT_SETS", "ExpertSet", "TrainSpec", "build_experts", "load_split_docs"]

MANIFEST = "expert.json"
TRAIN_VERSION = 2
"""Bumped whenever training makes different weights from the same spec (2: length-bucketed batch order), so a cached
expert built by other code is rebuilt instead of reused (its key changes)."""


@dataclass(frozen=True)
class TrainSpec:
    """One expert's fine-tune: ``steps`` AdamW steps of ``batch`` sequences at peak ``lr`` (linear warmup, cosine
    to 10%); ``kind`` ``qa`` (loss on the worked answer) or ``text`` (loss on the question's every token)."""

    language: str
    kind: str
    steps: int
    lr: float = 5e-5
    batch: int = 8
    warmup: int = 10
    max_tokens: int = 512  # longer sequences are cut (none of the default languages' instances reach it)


@dataclass(frozen=True)
class ExpertSet:
    """A base, the data splits and the two experts' fine-tunes; ``key()`` names what a build must reproduce."""

    name: str
    base: str
    split: SplitSpec
    math: TrainSpec
    lang: TrainSpec
    seed: int = 0
    save_every: int = 20
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.lang.language

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "train_version": TRAIN_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _default(target: str, *, languages: tuple[str, ...] = ()) -> ExpertSet:
    """40 seen templates (plus 10 held out) with 40 English training instances each: the arithmetic of a template
    needs many instances (one epoch over 64 templates x 16 instances gave the math expert +5 points on test; a
    probe with 40 templates x 26 instances +20 on new instances of them, docs/real-experts.md)."""
    langs = tuple(dict.fromkeys(("eng", target, *languages)))
    return ExpertSet(
        name=f"smollm2-{target}", base="real:smollm2-135m",
        split=SplitSpec(languages=langs, train={"eng": 40, target: 24}, validation=2, test=4,
                        heldout_templates=10, heldout_per_template=4, seed=0, max_templates=50),
        math=TrainSpec("eng", "qa", steps=200), lang=TrainSpec(target, "text", steps=120))


EXPERT_SETS: dict[str, ExpertSet] = {s.name: s for s in (_default("fra", languages=("deu", "swh")),)}
"""Named expert sets (``real:<name>/math``). ``tiny`` variants for tests come from :func:`tiny_set`."""


def tiny_set(target: str = "fra", *, steps: int = 3, seed: int = 0) -> ExpertSet:
    """A few steps on a handful of templates: the whole pipeline in about a minute (tests, CI)."""
    s = _default(target)
    return replace(s, name=f"tiny-{target}-{seed}", seed=seed, save_every=1,
                   split=replace(s.split, train={"eng": 2, target: 2}, validation=1, test=1, heldout_templates=2,
                                 heldout_per_template=1, max_templates=5),
                   math=replace(s.math, steps=steps, batch=2), lang=replace(s.lang, steps=steps, batch=2))


# ---------------------------------------------------------------- data

def _docs_path(root: Path, lang: str, split: str) -> Path:
    return root / "data" / f"docs_{lang}_{split}.jsonl"


def _build_data(spec: ExpertSet, root: Path, log: Callable[[str], None]) -> Path:
    """Instances (once per split spec) and task files (once per :data:`TASKS_VERSION`); ``data/DONE`` records both."""
    done = root / "data" / "DONE"
    try:
        state = json.loads(done.read_text()) if done.is_file() else {}
    except json.JSONDecodeError:
        state = {"split": done.read_text().strip()}  # an earlier format: the split key alone
    if state.get("split") != spec.split.key():
        t0 = time.time()
        splits = build_splits(spec.split, progress=log)
        for lang, parts in splits.items():
            for split, docs in parts.items():
                write_jsonl(_docs_path(root, lang, split), (asdict(d) for d in docs))
        state = {"split": spec.split.key()}
        done.write_text(json.dumps(state))
        log(f"data: {', '.join(f'{lang} ' + '/'.join(str(len(v)) for v in p.values()) for lang, p in splits.items())}"
            f" (train/validation/test) in {time.time() - t0:.0f} s")
    if state.get("tasks") != TASKS_VERSION or not (root / "tasks").is_dir():
        splits = {lang: {split: load_split_docs(root, lang, split) for split in ("validation", "test")}
                  for lang in spec.split.languages}
        tasks_tmp = root / ".tasks.tmp"
        shutil.rmtree(tasks_tmp, ignore_errors=True)
        write_tasks(splits, tasks_tmp, seed=spec.split.seed)
        for y in tasks_tmp.glob("*.yaml"):  # the YAMLs name their data by absolute path: point them at the final place
            y.write_text(y.read_text().replace(str(tasks_tmp), str(root / "tasks")))
        shutil.rmtree(root / "tasks", ignore_errors=True)
        os.replace(tasks_tmp, root / "tasks")
        done.write_text(json.dumps({**state, "tasks": TASKS_VERSION}))
        log(f"tasks: {', '.join(sorted(p.stem for p in (root / 'tasks').glob('*.yaml')))}")
    return root / "tasks"


def load_split_docs(root: Path, lang: str, split: str) -> list[MathDoc]:
    with open(_docs_path(root, lang, split), encoding="utf-8") as f:
        return [MathDoc(**json.loads(line)) for line in f]


# ---------------------------------------------------------------- training

def _examples(docs: list[MathDoc], kind: str, tok, max_tokens: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored target) per document; the sequence ends with EOS."""
    eos = tok.eos_token_id
    out = []
    for d in docs:
        if kind == "qa":
            prompt = tok(PROMPT.format(q=d.question), add_special_tokens=False)["input_ids"]
            target = tok(" " + d.answer, add_special_tokens=False)["input_ids"] + [eos]
            ids, start = prompt + target, len(prompt)
        elif kind == "text":
            ids, start = tok(f"Question: {d.question}", add_special_tokens=False)["input_ids"] + [eos], 1
        else:
            raise ConfigError(f"TrainSpec.kind={kind!r}; use qa or text")
        out.append((ids[:max_tokens], start))
    return out


def _batch(examples: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and the mask (B, L) of positions whose *next* token is scored."""
    L = max(len(ids) for ids, _ in examples)
    ids_t = torch.full((len(examples), L), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.bool)
    for b, (ids, start) in enumerate(examples):
        ids_t[b, :len(ids)] = torch.tensor(ids)
        mask[b, start - 1:len(ids) - 1] = True
    return ids_t, mask


def _lr(spec: TrainSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    p = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def _order(lengths: list[int], steps: int, batch: int, seed: int) -> list[int]:
    """Example indices for every step: epochs of seeded permutations, as many as the steps need; within each
    window of 8 batches the examples are sorted by length, so a batch pads little (a third fewer tokens computed
    on English worked answers), and the windows' batches are shuffled back (no length curriculum)."""
    rng, out = random.Random(seed), []
    n, window = len(lengths), 8 * batch
    while len(out) < steps * batch:
        perm = list(range(n))
        rng.shuffle(perm)
        for w in range(0, n, window):
            chunk = sorted(perm[w:w + window], key=lambda i: lengths[i])
            batches = [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
            rng.shuffle(batches)
            out += [i for b in batches for i in b]
    return out[:steps * batch]


def _save_state(state_dir: Path, model, opt, step: int, losses: list[float], seconds: float) -> None:
    from safetensors.torch import save_file

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
               or not model.config.tie_word_embeddings}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": seconds,
                                                   "torch_rng": torch.get_rng_state().tolist()}))
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(state_dir: Path, model, opt) -> tuple[int, list[float], float]:
    from safetensors.torch import load_file

    if not (state_dir / "progress.json").is_file():
        return 0, [], 0.0
    model.load_state_dict(load_file(str(state_dir / "model.safetensors")), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    prog = json.loads((state_dir / "progress.json").read_text())
    torch.set_rng_state(torch.tensor(prog["torch_rng"], dtype=torch.uint8))
    return prog["step"], prog["losses"], prog["seconds"]


def train_expert(spec: ExpertSet, role: str, root: Path, *, log: Callable[[str], None]) -> Path:
    """Fine-tune the base into ``root/<role>`` (``math`` or ``lang``); resumes from ``root/<role>.state``."""
    from transformers import AutoModelForCausalLM

    from dfsmerge.io.reader import resolve_model_path
    from dfsmerge.io.tokenizer import load_tokenizer

    train = spec.math if role == "math" else spec.lang
    out = root / role
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("key") == spec.key():
        return out
    base = resolve_model_path(spec.base)
    tok = load_tokenizer(base)
    docs = load_split_docs(root, train.language, "train")
    examples = _examples(docs, train.kind, tok, train.max_tokens)
    order = _order([len(e[0]) for e in examples], train.steps, train.batch, spec.seed + (0 if role == "math" else 1))
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state_dir = root / f"{role}.state"
    step, losses, seconds = _load_state(state_dir, model, opt)
    if step:
        log(f"{role}: resuming at step {step}/{train.steps}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    while step < train.steps:
        t0 = time.time()
        chunk = [examples[i] for i in order[step * train.batch:(step + 1) * train.batch]]
        ids, mask = _batch(chunk, pad)
        h = model.model(input_ids=ids).last_hidden_state  # (B, L, D); right padding: no attention mask needed
        logits = model.lm_head(h[:, :-1][mask[:, :-1]])  # (N, V)
        loss = F.cross_entropy(logits, ids[:, 1:][mask[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = _lr(train, step)
        opt.step()
        step += 1
        losses.append(round(loss.item(), 5))
        seconds += time.time() - t0
        if step % 5 == 0 or step == train.steps:
            tps = sum(len(c[0]) for c in chunk) / max(time.time() - t0, 1e-9)
            eta = seconds / step * (train.steps - step)
            log(f"{role}: step {step}/{train.steps} loss {sum(losses[-5:]) / len(losses[-5:]):.3f} "
                f"({tps:.0f} tokens/s, {seconds / 60:.1f} min, about {eta / 60:.0f} min left)")
        if step % spec.save_every == 0 and step < train.steps:
            _save_state(state_dir, model, opt, step, losses, seconds)
    model.eval()
    model.config.use_cache = True
    tmp = root / f".{role}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps({"key": spec.key(), "role": role, "set": spec.name,
                                            "train": asdict(train), "base": spec.base, "seed": spec.seed,
                                            "examples": len(examples), "final_loss": losses[-10:],
                                            "minutes": round(seconds / 60, 1)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(state_dir, ignore_errors=True)
    log(f"{role}: done in {seconds / 60:.1f} min, {out}")
    return out


def build_experts(spec: ExpertSet | str, *, root: Path | None = None, roles: tuple[str, ...] = ("math", "lang"),
                  threads: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Data, tasks and experts of ``spec`` under ``root`` (default: the expert-set cache); reuses what is built.

    Raises:
        ConfigError: an unknown set name or role.
    """
    if isinstance(spec, str):
        if spec not in EXPERT_SETS:
            raise ConfigError(f"expert set {spec!r} is not known; use one of {', '.join(EXPERT_SETS)}")
        spec = EXPERT_SETS[spec]
    for r in roles:
        if r not in ("math", "lang"):
            raise ConfigError(f"role {r!r}; use math or lang")
    root = Path(root) if root is not None else expert_set_dir(spec.name)
    root.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    logfile = open(root / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 - closed below

    def both(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log(line)
        logfile.write(line + "\n")
        logfile.flush()

    try:
        with building(root):  # a second process building the same set waits, then finds it built
            (root / "set.json").write_text(json.dumps({"key": spec.key(), **asdict(spec)}, indent=1, default=str))
            _build_data(spec, root, both)
            for role in roles:
                train_expert(spec, role, root, log=both)
    finally:
        logfile.close()
    return root
