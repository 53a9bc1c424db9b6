"""Build, load and resolve the toy zoo: tiny Llama models trained on CPU with a task that needs two experts.

Layout of a zoo directory::

    zoo.json                 models (name -> path relative to the zoo, role) and tasks (name -> yaml, skill, ...)
    models/<name>/           HF checkpoints (safetensors) with the zoo tokenizer
    data/<task>/<split>.jsonl
    tasks/<task>.yaml        lm-eval task YAMLs (absolute data paths; rewritten by ``load_zoo`` if the zoo moved)
    BUILD_COMPLETE.json      written last: the build parameters (a zoo without it is unfinished)

The setting is Sakana AI's evolutionary model merging (Akiba et al. 2024, arXiv 2403.13187) in miniature: a math
expert and a "language" expert (reads and writes language B) fine-tuned from one base, and a combined task (math
asked in B, answered in E) that no source solves. The default recipe is :func:`_robust_phases`; ``NOTES.md`` beside
this file has the measurements behind it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError
from dfsmerge.io.cache import build_once, cache_root
from dfsmerge.zoo import tasks as T
from dfsmerge.zoo.train import ModelShape, Phase, exact_match, llama_config, train_phase

FORMAT_VERSION = 2
MARKER = "BUILD_COMPLETE.json"
ZOO_JSON = "zoo.json"


@dataclass(frozen=True)
class ZooSize:
    """Everything a size fixes: model shape, phases (by model), batch size, held-out generic set sizes, and how
    many samples per split the build's own metrics score (None: all)."""

    shape: ModelShape
    phases: dict[str, tuple[Phase, ...]]
    batch_size: int
    generic_sizes: dict[str, int]
    metric_samples: int | None = None


def _phases(base: int, math_steps: int, lang1: int, lang2: int, warmup: int, *, lang1_lr: float = 1e-2,
            lang1_trainable: str = "b_rows") -> dict[str, tuple[Phase, ...]]:
    return {
        "base": (Phase("base", "base", base, 3e-3, "all", warmup),),
        "math": (Phase("math", "math", math_steps, 1e-3, "no_embed", warmup),),
        "language": (Phase("lang1", "lang1", lang1, lang1_lr, lang1_trainable, warmup),
                     Phase("lang2", "lang2", lang2, 1e-3, "no_embed", warmup)),
    }


def _robust_phases(shape: ModelShape, *, noise: float = 0.4, b_rows_lr_scale: float = 0.2
                   ) -> dict[str, tuple[Phase, ...]]:
    """The default recipe (``dfsmerge/zoo/NOTES.md`` has the measurements).

    - Base: generic tasks in E, everything trained.
    - Math expert: the decoder layers only (embedding, final norm and head frozen), trained at weights perturbed by
      Gaussian noise (``noise`` x each matrix's RMS): without it the math skill breaks as soon as a merge adds a
      third of the other expert's change (math in E 100% -> 76%); with it merges keep far more of it.
    - Language expert, phase 1 (read B, answer in E): the B-digit embedding rows at ``b_rows_lr_scale`` of the LR
      and decoder layer 0, so reading B lives mostly in layer 0, where the math expert also changed things (an
      embedding swap no longer solves the combined task, and a merge has to weigh the two experts' layer 0).
    - Language expert, phase 2 (answer in the language asked): layers 1..N-1, final norm and head, so it
      conflicts with the math expert's later layers and pulls a merge toward B answers.
    """
    n = shape.num_layers
    return {
        "base": (Phase("base", "base", 1500, 3e-3, "all", 50),),
        "math": (Phase("math", "math", 2000, 1e-3, "blocks", 50, weight_noise=noise),),
        "language": (Phase("lang1", "lang1", 1200, 3e-3, "b_rows_l0", 50, embed_lr_scale=b_rows_lr_scale,
                           weight_noise=noise),
                     Phase("lang2", "lang2", 400, 1e-3, f"blocks:1-{n - 1}+head", 50, weight_noise=noise)),
    }


_SHAPE4 = ModelShape(num_layers=4, hidden=64, intermediate=128, heads=4)
_FULL_SETS = {"test": 2000, "validation": 600, "train": 2000}
SIZES: dict[str, ZooSize] = {
    "tiny": ZooSize(ModelShape(num_layers=2, hidden=32, intermediate=64, heads=2),
                    _phases(12, 12, 8, 8, 2, lang1_lr=3e-3, lang1_trainable="b_rows_l0"),
                    batch_size=16, generic_sizes={"test": 200, "validation": 100, "train": 100}, metric_samples=100),
    # Noise-trained experts, reading B mostly in layer 0. Seeds 0 / 1 (README table): every source <= 0.1% and
    # every unsearched merge <= 7.8% on the combined task; PS CMA-ES 39.4 / 26.0%, PS+DFS joint 41.2 / 58.9%.
    "default": ZooSize(_SHAPE4, _robust_phases(_SHAPE4), batch_size=128, generic_sizes=_FULL_SETS),
    # The previous default: round 3 plus language phase 1 training decoder layer 0 (LR 3e-3). Its language
    # expert's embedding alone reads B: an embedding swap scores 87-93% on the combined task.
    "l0": ZooSize(_SHAPE4, _phases(1500, 2000, 1200, 400, 50, lang1_lr=3e-3, lang1_trainable="b_rows_l0"),
                  batch_size=128, generic_sizes=_FULL_SETS),
    # Round 3 of the notes exactly (phase 1 trains only the B-digit rows). Seed 0: TA 10.1%, TIES 35.1%,
    # CMA-ES per-layer TA 31-51%: search does not clearly beat TIES here.
    "round3": ZooSize(_SHAPE4, _phases(1500, 2000, 1200, 400, 50), batch_size=128, generic_sizes=_FULL_SETS),
}
ROLES = {"base": "base", "math": "expert:math", "language": "expert:language"}
PARENT = {"base": None, "math": "base", "language": "base"}


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path  # absolute
    role: str


@dataclass(frozen=True)
class ZooTask:
    name: str  # also the lm-eval task name
    yaml: Path  # absolute
    skill: str
    combined: bool
    data_files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Zoo:
    """A finished zoo on disk. ``task_dir`` is the ``include_path`` for ``lm_eval.tasks.TaskManager``."""

    root: Path
    size: str
    seed: int
    models: dict[str, ZooModel]
    tasks: dict[str, ZooTask]
    combined_task: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def task_dir(self) -> Path:
        return self.root / "tasks"

    def model_path(self, name: str) -> Path:
        """Checkpoint directory of model ``name``.

        Raises:
            ConfigError: no model of that name.
        """
        if name not in self.models:
            raise ConfigError(f"zoo model {name!r} does not exist in {self.root}; use one of {sorted(self.models)}")
        return self.models[name].path

    def checksums(self) -> dict[str, str]:
        """SHA-256 of every file that a build determines, by relative path (task YAMLs, which hold absolute
        paths, and the marker, which holds timings, are left out)."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not rel.startswith("tasks/") and rel != MARKER:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def default_zoo_dir(size: str = "default", seed: int = 0) -> Path:
    """Where a zoo lives when none is named: ``$DFSMERGE_ZOO`` if set, else
    ``$DFSMERGE_CACHE/zoo/<size>-seed<seed>-v<build format>`` (:func:`~dfsmerge.io.cache.cache_root`; a new
    recipe never meets an old build)."""
    env = os.environ.get("DFSMERGE_ZOO")
    if env:
        return Path(env).expanduser()
    return cache_root() / "zoo" / f"{size}-seed{seed}-v{FORMAT_VERSION}"


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_zoo(root: str | Path) -> bool:
    """Whether ``root`` holds a finished zoo build."""
    return _read_marker(Path(root)) is not None


def load_zoo(root: str | Path) -> Zoo:
    """Open a finished zoo. Task YAMLs are rewritten in place when the zoo was moved since it was built.

    Raises:
        CheckpointError: ``root`` holds no finished build.
    """
    root = Path(root).expanduser().resolve()
    marker = _read_marker(root)
    if marker is None:
        raise CheckpointError(f"zoo directory {str(root)!r} holds no finished build ({MARKER} missing); "
                              f"build it with dfsmerge.zoo.build_zoo({str(root)!r})")
    meta = json.loads((root / ZOO_JSON).read_text())
    models = {n: ZooModel(n, root / m["path"], m["role"]) for n, m in meta["models"].items()}
    tasks = {}
    for n, t in meta["tasks"].items():
        files = {s: root / p for s, p in t["data_files"].items()}
        yaml_path = root / t["yaml"]
        text = T.task_yaml(T.TASKS[n], files, max_gen_toks=t.get("max_gen_toks", 8))
        if yaml_path.read_text() != text:  # moved or copied zoo: point the YAML at this copy's data
            yaml_path.write_text(text)
        tasks[n] = ZooTask(n, yaml_path, t["skill"], t["combined"], files)
    return Zoo(root, marker["size"], marker["seed"], models, tasks, meta["combined_task"],
               meta.get("metrics", {}))


def _save_model(model, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per zoo, not one per shard
    try:
        model.save_pretrained(str(out))
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    T.save_tokenizer(out)


def _build_into(tmp: Path, final: Path, size: str, spec: ZooSize, seed: int, progress: bool,
                log: Callable[[str], None]) -> dict:
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    math_idx = T.math_splits(seed)
    generic_keys = T.generic_heldout(seed, spec.generic_sizes)
    heldout = set(generic_keys["test"]) | set(generic_keys["validation"])

    # data and task YAMLs (the YAMLs point at the final location)
    tasks_meta = {}
    for name, tspec in T.TASKS.items():
        samples = T.task_samples(tspec, math_idx, generic_keys)
        rel = {s: f"data/{name}/{s}.jsonl" for s in samples}
        for s, rows in samples.items():
            T.write_jsonl(tmp / rel[s], rows)
        (tmp / "tasks").mkdir(parents=True, exist_ok=True)
        (tmp / "tasks" / f"{name}.yaml").write_text(T.task_yaml(tspec, {s: final / r for s, r in rel.items()}))
        tasks_meta[name] = {"yaml": f"tasks/{name}.yaml", "skill": tspec.skill, "combined": tspec.combined,
                            "description": tspec.description, "data_files": rel, "max_gen_toks": 8,
                            "sizes": {s: len(v) for s, v in samples.items()}}

    total = sum(p.steps for ps in spec.phases.values() for p in ps)
    bar = tqdm(total=total, desc=f"zoo {size} seed {seed}", disable=not progress, unit="step")
    models, trained, timings = {}, {}, {}
    for name in ("base", "math", "language"):
        t0 = time.perf_counter()
        if PARENT[name] is None:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama_config(spec.shape)).float()
        else:
            model = LlamaForCausalLM(llama_config(spec.shape)).float()
            model.load_state_dict(trained[PARENT[name]])
        for i, phase in enumerate(spec.phases[name]):
            bar.set_postfix_str(phase.name)
            loss = train_phase(model, phase, seed=seed, batch_size=spec.batch_size, math_train=math_idx["train"],
                               heldout=heldout, on_step=lambda _loss: bar.update(1))
            log(f"{name} phase {i + 1} ({phase.name}): {phase.steps} steps, final loss {loss:.4f}")
        trained[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save_model(model, tmp / "models" / name)
        models[name] = {"path": f"models/{name}", "role": ROLES[name], "parent": PARENT[name]}
        timings[name] = round(time.perf_counter() - t0, 2)
    bar.close()

    # exact match of every model on every task's validation and test split (teacher-forced, = greedy)
    metrics: dict[str, dict[str, float]] = {}
    for name in models:
        model = LlamaForCausalLM(llama_config(spec.shape)).float()
        model.load_state_dict(trained[name])
        for tname in T.TASKS:
            for split in ("validation", "test"):
                rows = T.read_jsonl(tmp / tasks_meta[tname]["data_files"][split])[:spec.metric_samples]
                em = float(exact_match(model, rows).mean())
                metrics.setdefault(name, {})[f"{tname}/{split}"] = round(100.0 * em, 2)
    meta = {"format_version": FORMAT_VERSION, "size": size, "seed": seed,
            "shape": {"num_layers": spec.shape.num_layers, "hidden": spec.shape.hidden,
                      "intermediate": spec.shape.intermediate, "heads": spec.shape.heads},
            "models": models, "tasks": tasks_meta, "combined_task": T.COMBINED_TASK,
            "metrics": metrics, "metrics_note": "exact match %, teacher-forced (equal to greedy exact match)"
            + (f", first {spec.metric_samples} samples per split" if spec.metric_samples else "")}
    (tmp / ZOO_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return timings


def build_zoo(out_dir: str | Path, *, size: str = "default", seed: int = 0, progress: bool = True,
              force: bool = False, threads: int | None = None,
              log: Callable[[str], None] | None = None) -> Zoo:
    """Train the toy zoo (base, math expert, language expert) on CPU and write it to ``out_dir``.

    A finished build with the same size and seed is reused as is. The build happens in a temporary directory
    beside ``out_dir`` and is renamed into place, so ``out_dir`` never holds half a zoo.

    Args:
        out_dir: the zoo directory (created).
        size: ``tiny`` (seconds; for tests, accuracy irrelevant), ``default`` (minutes; noise-trained experts,
            reading B mostly in layer 0, so no unsearched merge solves the combined task while a per-layer search
            finds a good merge; ``NOTES.md`` beside this file), ``l0`` (the previous default) or ``round3``
            (an earlier recipe, see ``NOTES.md``).
        seed: seeds the weights, the data stream and the math split.
        progress: show a tqdm progress bar over training steps.
        force: replace an existing non-empty ``out_dir`` that is not a finished zoo of this size and seed.
        threads: torch CPU threads during training (default: ``torch.get_num_threads()`` at call time). File
            checksums are deterministic for a given (size, seed, threads) on one machine.
        log: called with one line per training phase.

    Returns:
        The :class:`Zoo` (see :func:`load_zoo`).

    Raises:
        ConfigError: unknown ``size``.
        OutputExistsError: ``out_dir`` holds something else (another size or seed, or other files) and not
            ``force``.
    """
    if size not in SIZES:
        raise ConfigError(f"zoo size={size!r} is unknown; use one of {sorted(SIZES)}")
    out = Path(out_dir).expanduser().resolve()
    build_once(out, lambda: _is_built(out, size, seed), lambda: _build(out, size, seed, progress, force, threads, log))
    return load_zoo(out)


def _is_built(out: Path, size: str, seed: int) -> bool:
    marker = _read_marker(out)
    return marker is not None and marker.get("size") == size and marker.get("seed") == seed \
        and marker.get("format_version") == FORMAT_VERSION


def _build(out: Path, size: str, seed: int, progress: bool, force: bool, threads: int | None,
           log: Callable[[str], None] | None) -> None:
    marker = _read_marker(out)
    if out.exists() and any(out.iterdir()) and not force:
        what = (f"a zoo of size={marker.get('size')!r} seed={marker.get('seed')!r}"
                f" (build format {marker.get('format_version')}, this dfsmerge builds format {FORMAT_VERSION})"
                if marker else "files that are not a finished zoo")
        raise OutputExistsError(f"zoo directory {str(out)!r} holds {what}, not size={size!r} seed={seed}; "
                                f"pass force=True (--force) to replace it, or choose another directory")
    log = log or (lambda _msg: None)
    spec = SIZES[size]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    n_threads = threads or old_threads
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(n_threads)
        torch.use_deterministic_algorithms(True)
        timings = _build_into(tmp, out, size, spec, seed, progress, log)
        (tmp / MARKER).write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "size": size, "seed": seed, "threads": n_threads,
             "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 2), "model_seconds": timings},
            indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_zoo_model(ref: str, zoo_dir: str | Path | None = None, *, size: str = "default", seed: int = 0,
                      progress: bool = True) -> Path:
    """Checkpoint path of ``zoo:<name>``, building the zoo when it is missing.

    The zoo is ``zoo_dir`` if given, else :func:`default_zoo_dir` (``size``, ``seed``). A finished zoo found
    there is used whatever its size and seed; a missing one is built with ``size`` and ``seed``.

    Raises:
        ConfigError: ``ref`` does not start with ``zoo:`` or names no zoo model.
    """
    if not isinstance(ref, str) or not ref.startswith("zoo:") or len(ref) <= 4:
        raise ConfigError(f"model reference {ref!r} is not a zoo reference; write 'zoo:<name>', e.g. 'zoo:math'")
    root = Path(zoo_dir).expanduser() if zoo_dir is not None else default_zoo_dir(size, seed)
    zoo = load_zoo(root) if is_zoo(root) else build_zoo(root, size=size, seed=seed, progress=progress)
    return zoo.model_path(ref[4:])
