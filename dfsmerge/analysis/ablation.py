"""Why a found candidate works: its ablations, scored on one split with paired tests against it
(``dfsmerge ablate RUN``).

Rows (each written as a plan/recipe under ``RUN/ablation/rows/``, so any row can be scored with ``dfsmerge eval`` or
exported):

- ``candidate``: the candidate itself;
- ``scales=1``: every step scale set to 1 (the paper's scaling ablation, Akiba et al. 2024, arXiv 2403.13187, sec. 4.1:
  dropping the scaling matrix cost their evolved path more than 20 points);
- ``drop k``: step k removed (leave-one-out, one row per step of the path);
- ``dedup M[i]``: a layer that the path runs more than once, kept at its first visit only;
- PS+DFS genomes: ``ps-only`` (the merged model in its own layer order) and ``dfs-unmerged`` (the path with the
  merged model's layers taken from the unmerged base model);
- ``source NAME``: each source model as it is.

Rows are scored in one process over the run's resident layer pool (the search's own
:class:`dfsmerge.search.worker.Worker`: one load of every source, merged weights re-merged in place, the prefix store
serving the prefixes leave-one-out paths share), on the run's task objectives, optionally on another split.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfsmerge.errors import ConfigError

PS_MODEL_IN_PLAN = "@ps"  # as dfsmerge.genome.PS_MODEL_IN_PLAN (kept here so the report needs no torch import)


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a PS recipe dict and/or a plan dict, and what was changed.

    Attributes:
        name: a short file-safe id (``drop-03``). label: what the row is, in words.
        kind: ``candidate``, ``scales``, ``drop``, ``dedup``, ``ps-only``, ``dfs-unmerged`` or ``source``.
        ps: mergekit recipe dict of the PS part (None without one). path: plan dict (None for a PS-only model).
        step: the removed step (``drop`` rows). model: the source model of that step, or the ``source`` row's model.
    """

    name: str
    label: str
    kind: str
    ps: Mapping[str, Any] | None
    path: Mapping[str, Any] | None
    step: int | None = None
    model: str | None = None


def _with_steps(path: Mapping[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {**path, "path": [dict(s) for s in steps]}


def ablation_variants(ps: Mapping[str, Any] | None, path: Mapping[str, Any] | None, *,
                      sources: Mapping[str, tuple[str, int]], ps_base: str | None = None) -> list[Variant]:
    """The ablations of a candidate (see the module docstring), candidate first.

    Args:
        ps: the candidate's PS recipe dict (or None). path: its plan dict (or None).
        sources: ``{model name: (checkpoint path, decoder layers)}`` of the source models, in the order to list them.
        ps_base: name (a key of ``sources``) of the model whose layers stand in for the merged model's in the
            ``dfs-unmerged`` row (the PS recipe's base model).
    """
    rows = [Variant("candidate", "the candidate", "candidate", ps, path)]
    if path is not None:
        steps = list(path["path"])
        uses_ps = PS_MODEL_IN_PLAN in path["models"].values()
        if any(not math.isclose(float(s["scale"]), 1.0) for s in steps):
            rows.append(Variant("scales-1", "every step scale set to 1", "scales", ps,
                                _with_steps(path, [{**s, "scale": 1.0} for s in steps])))
        if len(steps) > 1:
            width = len(str(len(steps) - 1))
            for k, s in enumerate(steps):
                rows.append(Variant(f"drop-{k:0{width}d}", f"step {k} ({s['model']}[{s['layer']}]) removed", "drop",
                                    ps, _with_steps(path, steps[:k] + steps[k + 1:]), step=k, model=s["model"]))
        counts = Counter((s["model"], s["layer"]) for s in steps)
        for (m, i), c in counts.items():
            if c > 1:
                seen, kept = False, []
                for s in steps:
                    if (s["model"], s["layer"]) == (m, i):
                        if seen:
                            continue
                        seen = True
                    kept.append(s)
                rows.append(Variant(f"dedup-{_slug(m)}-{i}", f"{m}[{i}] kept at its first of {c} visits", "dedup",
                                    ps, _with_steps(path, kept), model=m))
        if uses_ps and ps is not None:
            rows.append(Variant("ps-only", "the PS-merged model alone (its own layer order)", "ps-only", ps, None))
            if ps_base is not None and ps_base in sources:
                merged = [k for k, v in path["models"].items() if v == PS_MODEL_IN_PLAN]
                ren = {k: ps_base for k in merged}
                models = {k: v for k, v in path["models"].items() if k not in merged}
                models[ps_base] = sources[ps_base][0]
                unmerged = {"models": models, "base": ren.get(path["base"], path["base"]),
                            "path": [{**s, "model": ren.get(s["model"], s["model"])} for s in steps]}
                if path.get("embed") is not None:
                    unmerged["embed"] = ren.get(path["embed"], path["embed"])
                rows.append(Variant("dfs-unmerged", f"the path over the unmerged sources ({ps_base} for the merged "
                                    "model)", "dfs-unmerged", None, unmerged))
    for name, (ref, n) in sources.items():
        rows.append(Variant(f"source-{_slug(name)}", f"source model {name}", "source", None,
                            {"models": {name: ref}, "base": name,
                             "path": [{"model": name, "layer": i, "scale": 1.0} for i in range(n)]}, model=name))
    return rows


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


# ================================================================================================ scoring
@dataclass(frozen=True)
class AblationRow:
    """A scored row: the variant, its scores, and per objective the paired test against the candidate."""

    variant: Variant
    scores: Mapping[str, float]
    per_document: Mapping[str, list[float]]
    tests: Mapping[str, Any]  # {objective key: PairedTest | None (the candidate row)}
    files: tuple[str, ...]


def _task_config(config: dict[str, Any], split: str | None) -> dict[str, Any]:
    """The run's config with only its task objectives (on ``split`` when given), racing off."""
    cfg = json.loads(json.dumps(config))
    tasks = [o for o in cfg.get("objectives", []) if o.get("type", "task") == "task"]
    if not tasks:
        raise ConfigError("dfsmerge ablate: the run has no task objective to score (only cost or synthetic ones); "
                          "ablate a run that optimised an lm-eval or native task")
    if split is not None:
        tasks = [{**o, "split": split} for o in tasks]
    cfg["objectives"] = tasks
    if isinstance(cfg.get("racing"), dict):
        cfg["racing"]["enabled"] = False
    return cfg


class AblationScorer:
    """Scores variants over one resident pool (a :class:`dfsmerge.search.worker.Worker` of the run's config).

    Args:
        config: the run's resolved config dict (``config.yaml``).
        split: score the task objectives on this split instead of the run's.
        eval_dtype: the dtype to score in (default: the run's chosen ``eval_dtype``, else its ``dtype``).
    """

    def __init__(self, config: dict[str, Any], *, split: str | None = None, eval_dtype: str | None = None) -> None:
        from dfsmerge.search.worker import Worker

        self.config = _task_config(config, split)
        self.worker = Worker(self.config)
        if eval_dtype is not None:
            self.worker.set_eval_dtype(eval_dtype)
        self.keys = [o.key for o in self.worker.config.objectives]
        self.directions = dict(self.worker.directions)

    def sources(self) -> dict[str, tuple[str, int]]:
        """``{name: (path, decoder layers)}`` of the pool's source models (the merged one left out)."""
        from dfsmerge.io import open_checkpoint

        return {name: (ref, int(open_checkpoint(ref).config["num_hidden_layers"]))
                for name, ref in self.worker.models.pool.items()}

    def ps_recipe(self, genome, stage: int, fixed_ps) -> Any:
        """The :class:`dfsmerge.genome.PSRecipe` of a record (decoded from its genome, as the search did)."""
        import numpy as np

        self.worker.set_stage(stage, fixed_ps if stage == 2 else None)  # staged: stage 2 decodes over stage 1's best
        return self.worker.space.decode(np.asarray(genome, dtype=np.float64)).ps

    def score(self, variant: Variant, ps_recipe) -> tuple[dict[str, float], dict[str, list[float]]]:
        """``(scores, per-document values)`` of a variant (``ps_recipe``: the PSRecipe object of ``variant.ps``)."""
        import torch

        from dfsmerge.genome import Candidate
        from dfsmerge.genome.plan import PathPlan

        w = self.worker
        if w.runtime is None:
            w._load_runtime()
        cand = Candidate(ps=ps_recipe if variant.ps is not None else None,
                         path=None if variant.path is None else PathPlan.from_dict(variant.path))
        with torch.no_grad():
            model = w.runtime.prepare(cand)
            res = w.evaluator.evaluate(model)
            docs = w.evaluator.per_document(model)
        return {k: res.scores[k] for k in self.keys}, docs


def written_plan(variant: Variant, merged: tuple[str, int] | None) -> dict[str, Any] | None:
    """The plan a row is written as: its path with the PS-merged model (``@ps``) read from ``merged`` (the recipe
    merged once to disk: ``(directory, decoder layers)``), so every row is a plain plan file that ``dfsmerge eval``
    scores; a PS-only row becomes the merged model's own layer order."""
    if variant.path is None:
        if variant.ps is None or merged is None:
            return None
        return {"models": {"merged": merged[0]}, "base": "merged",
                "path": [{"model": "merged", "layer": i, "scale": 1.0} for i in range(merged[1])]}
    if merged is None:
        return dict(variant.path)
    return {**variant.path, "models": {k: (merged[0] if v == PS_MODEL_IN_PLAN else v)
                                       for k, v in variant.path["models"].items()}}


def write_variant(variant: Variant, out_dir: Path, merged: tuple[str, int] | None = None) -> tuple[str, ...]:
    """Write a row's ``plan.yaml`` (see :func:`written_plan`) and its ``recipe.yaml`` (the PS part, for the record)
    into ``out_dir``; returns the file names."""
    import yaml

    from dfsmerge.genome.plan import PathPlan

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    plan = written_plan(variant, merged)
    if plan is not None:
        (out_dir / "plan.yaml").write_text(PathPlan.from_dict(plan).to_yaml())
        files.append("plan.yaml")
    if variant.ps is not None:
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(dict(variant.ps), sort_keys=False))
        files.append("recipe.yaml")
    return tuple(files)


def run_ablation(run_dir: str | Path, *, candidate: str | int = "best", split: str | None = None,
                 out: str | Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Score a run's candidate and its ablations; write ``table.md``, ``table.json``, ``contribution.png`` and the
    rows' plans/recipes under ``out`` (default ``RUN/ablation``).

    Args:
        run_dir: the run directory.
        candidate: ``"best"`` or an id of ``evals.jsonl``.
        split: the split to score on (default: each objective's own split).
        out: where to write (default ``RUN/ablation``).
        log: progress lines (None: quiet).

    Returns:
        The output directory.

    Raises:
        ConfigError: unknown candidate, an infeasible one, a run without task objectives.
        CheckpointError: not a run directory.
    """
    from dfsmerge.report.report import model_names
    from dfsmerge.report.significance import paired_test
    from dfsmerge.rundir.reader import RunReader

    run = RunReader.open(run_dir)
    rec = run.best if str(candidate) == "best" else run.record(candidate)
    if rec is None:
        raise ConfigError(f"{run.path} has no scored candidate yet; wait for the search's first generation")
    if rec.infeasible or (rec.ps is None and rec.path is None):
        raise ConfigError(f"candidate {rec.id} of {run.path} is infeasible or empty; choose another --candidate")
    out_dir = Path(out) if out is not None else run.path / "ablation"
    if (out_dir / "rows").is_dir():  # an earlier ablation's rows: never mix two tables' files
        import shutil

        shutil.rmtree(out_dir / "rows")
    ed = (run.state.get("eval_dtype") or {}).get("dtype")
    scorer = AblationScorer(run.config, split=split, eval_dtype=ed)
    sources = scorer.sources()
    ps_base = None
    if rec.ps is not None:
        base_ref = rec.ps.get("base_model")
        ps_base = next((n for n, (ref, _) in sources.items() if ref == base_ref), None)
    recipe = scorer.ps_recipe(rec.genome, rec.stage, run.state.get("fixed_ps")) if rec.ps is not None else None
    if recipe is not None and json.dumps(recipe.to_mergekit(), sort_keys=True) != json.dumps(dict(rec.ps),
                                                                                             sort_keys=True):
        raise ConfigError(f"candidate {rec.id}: its genome no longer decodes to the recipe evals.jsonl holds (a run of "
                          "another dfsmerge version?); ablate it with the version that wrote it")
    variants = ablation_variants(rec.ps, rec.path, sources=sources, ps_base=ps_base)
    merged = None
    if rec.ps is not None:  # merged once to disk so that every row is a plain plan file (dfsmerge eval, export)
        from dfsmerge.recipe.config import load_merge_config
        from dfsmerge.recipe.executor import run_merge

        mdir = run_merge(load_merge_config(dict(rec.ps)), out_dir / "merged", seed=run.config.get("seed", 0),
                         force=True, progress=False)
        merged = (str(Path(mdir).resolve()), next(n for _, n in sources.values()))
    rows: list[AblationRow] = []
    base_docs: dict[str, list[float]] = {}
    for i, v in enumerate(variants):
        scores, docs = scorer.score(v, recipe)
        files = write_variant(v, out_dir / "rows" / f"{i:02d}-{v.name}", merged)
        if v.kind == "candidate":
            base_docs = docs
            tests: dict[str, Any] = dict.fromkeys(scorer.keys)
        else:
            tests = {k: paired_test(docs[k], base_docs[k]) for k in scorer.keys}
        rows.append(AblationRow(v, scores, docs, tests, files))
        if log is not None:
            log(f"ablate [{i + 1}/{len(variants)}] {v.label}: "
                + ", ".join(f"{k} {scores[k]:.4g}" for k in scorer.keys))
    names = model_names(run.config)
    _write_tables(rows, out_dir, rec.id, scorer.keys, scorer.directions, split, names)
    if rec.path is not None:
        plot_contributions(rows, scorer.keys[0], out_dir / "contribution.png", names)
    return out_dir


def _write_tables(rows: list[AblationRow], out_dir: Path, cand_id: int, keys: list[str],
                  directions: Mapping[str, str], split: str | None, names: Mapping[str, str]) -> None:
    cand = rows[0]
    table = {"candidate": cand_id, "split": split, "objectives": keys, "directions": dict(directions),
             "models": dict(names), "rows": []}
    for i, r in enumerate(rows):
        table["rows"].append({
            "row": i, "name": r.variant.name, "kind": r.variant.kind, "label": r.variant.label,
            "step": r.variant.step, "model": r.variant.model,
            "files": [f"rows/{i:02d}-{r.variant.name}/{f}" for f in r.files],
            "scores": dict(r.scores), "delta": {k: r.scores[k] - cand.scores[k] for k in keys},
            "documents": {k: len(r.per_document[k]) for k in keys},
            "tests": {k: (None if t is None else t.to_json()) for k, t in r.tests.items()}})
    (out_dir / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    head = ["#", "row", *(c for k in keys for c in (k, "Δ", "p")), "files"]
    docs = ", ".join(f"{k} {len(cand.per_document[k])}" for k in keys)
    lines = [f"# Ablation of candidate {cand_id}" + (f" on split `{split}`" if split else ""), "",
             f"Documents per row (each objective's own `limit` applies): {docs}.", "",
             "Δ: the row's score minus the candidate's; p: paired test against the candidate on the same documents "
             "(exact McNemar for 0/1 outcomes, paired bootstrap otherwise).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [str(i), r.variant.label]
        for k in keys:
            t = r.tests[k]
            cells += [f"{r.scores[k]:.4g}", "" if t is None else f"{r.scores[k] - cand.scores[k]:+.4g}",
                      "" if t is None else f"{t.p_value:.3g}"]
        cells.append(", ".join(f"[{f}](rows/{i:02d}-{r.variant.name}/{f})" for f in r.files))
        lines.append("| " + " | ".join(cells) + " |")
    scales = next((r for r in rows if r.variant.kind == "scales"), None)
    if scales is not None:
        k = keys[0]
        d = scales.scores[k] - cand.scores[k]
        lines += ["", f"Scales set to 1: {k} {d * 100:+.1f} points (the paper reports a drop of more than 20 points "
                  "for its evolved path, arXiv 2403.13187 sec. 4.1)."]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")


def plot_contributions(rows: list[AblationRow], key: str, out: Path, names: Mapping[str, str]) -> Path | None:
    """Per-step contribution along the path (candidate's score minus the score without that step), coloured by the
    step's source model."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    drops = [r for r in rows if r.variant.kind == "drop"]
    if not drops:
        return None
    cand = rows[0].scores[key]
    models = list(dict.fromkeys(r.variant.model for r in drops))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    n = len(drops)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 2), 3.6))
    xs = [r.variant.step for r in drops]
    ys = [cand - r.scores[key] for r in drops]
    ax.bar(xs, ys, color=[colors[r.variant.model] for r in drops], width=0.8)
    for r, x, y in zip(drops, xs, ys, strict=True):
        t = r.tests[key]
        if t is not None and t.p_value < 0.05:
            ax.text(x, y, "*", ha="center", va="bottom" if y >= 0 else "top", fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("step of the path")
    ax.set_ylabel(f"{key}: candidate − without the step")
    ax.set_title("per-step contribution (* paired p < 0.05)", fontsize=9)
    from matplotlib.patches import Patch

    # explicit handles: an empty ax.bar has no patch, so its legend entry took the default colour, not the model's
    ax.legend(handles=[Patch(color=colors[m], label=f"{m} ({names[m]})" if names.get(m, m) != m else m)
                       for m in models], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ================================================================================================ run significance
def run_significance(run_dir: str | Path, *, splits: tuple[str | None, ...] = (None,),
                     out: str | Path | None = None) -> dict[str, Any]:
    """Is the best better than the start and than each source? Rescores the best, the start (record 0) and every
    source model on each split (``None``: the objectives' own, i.e. validation) over one resident pool, and tests the
    best against each on the same documents. Writes ``RUN/report/significance.json`` (or ``out``) and returns it.

    Raises:
        ConfigError: a run without task objectives or without a scored candidate.
    """
    from dfsmerge.report.significance import SIGNIFICANCE_FILE, paired_test
    from dfsmerge.rundir.reader import RunReader

    run = RunReader.open(run_dir)
    best, start = run.best, run.start
    if best is None or start is None:
        raise ConfigError(f"{run.path} has no scored candidate yet; nothing to test")
    ed = (run.state.get("eval_dtype") or {}).get("dtype")
    result: dict[str, Any] = {"best": best.id, "start": start.id, "n_evals": len(run), "splits": {}}
    for split in splits:
        scorer = AblationScorer(run.config, split=split, eval_dtype=ed)
        sources = scorer.sources()
        fixed = run.state.get("fixed_ps")

        def score(rec, _scorer=scorer, _fixed=fixed):
            recipe = _scorer.ps_recipe(rec.genome, rec.stage, _fixed) if rec.ps is not None else None
            return _scorer.score(Variant(f"id-{rec.id}", f"candidate {rec.id}", "candidate", rec.ps, rec.path),
                                 recipe)

        b_scores, b_docs = score(best)
        others = [(f"start (id {start.id})", *score(start))]
        for v in ablation_variants(None, None, sources=sources)[1:]:  # the sources (row 0 is the empty candidate)
            others.append((f"source {v.model}", *scorer.score(v, None)))
        result["splits"][split or "objective"] = {
            "objectives": scorer.keys, "best": b_scores,
            "against": [{"model": name, "scores": s,
                         "tests": {k: paired_test(b_docs[k], d[k]).to_json() for k in scorer.keys}}
                        for name, s, d in others]}
    from dfsmerge.search.state import atomic_write

    path = Path(out) if out is not None else run.path / "report" / SIGNIFICANCE_FILE
    atomic_write(path, json.dumps(result, indent=2) + "\n")  # a full disk never leaves half a file in its place
    return result
