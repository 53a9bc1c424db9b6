"""Report writing: plots (matplotlib, Agg) and ``report.md``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TOP_K = 10


def _replace(out: Path, write) -> None:
    """``write(tmp)`` then rename it to ``out``: a write cut short (a full disk) never replaces a good file."""
    import os

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # `inspect` may redraw while the search writes its own
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``RUN/evals.jsonl`` as dicts (through :mod:`dfsmerge.rundir.reader`: a partial last
    line of a running search is left out).

    Raises:
        CheckpointError: no evals log in ``run_dir``, or a corrupt one.
    """
    from dfsmerge.rundir.reader import RunReader

    return RunReader.open(run_dir).rows()


def _fit(r: dict[str, Any]) -> float:
    f = r.get("fitness")
    return math.inf if f is None else float(f)


def describe_best(best: dict[str, Any] | None) -> str:
    """A candidate's objectives, each in its own direction (``real_arith 0.34, real_capitals 1``), for progress
    lines and summaries; its fitness only when it has no scores ("-" for none or a failed one)."""
    if best is None or not math.isfinite(_fit(best)):
        return "-"
    scores = best.get("objectives") or {}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} {v}" for k, v in scores.items()) \
        or f"fitness {_fit(best):.6g}"


def model_names(config: Mapping[str, Any]) -> dict[str, str]:
    """``{pool name: the model as the user wrote it}`` (``zoo:math``, a hub id or a path) from a run's config."""
    g = config.get("genome") or {}
    out = {}
    for m in list(g.get("models") or []) + list((g.get("dfs") or {}).get("models") or []):
        if isinstance(m, dict) and m.get("name"):
            out[m["name"]] = str(m.get("model", m["name"]))
    if g.get("base_model"):
        out.setdefault("base", str(g["base_model"]))
    return out


def summarize(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, best record (over all stages, as ``best/``) and best-so-far trajectory of a run's evals."""
    final_stage = max((r.get("stage", 1) for r in evals), default=1)
    best, curve, b = None, [], math.inf
    for r in evals:
        f = _fit(r)
        if f < _fit(best or {}):
            best = r
        b = min(b, f)
        curve.append(b)
    return {"n": len(evals), "failed": sum(1 for r in evals if r.get("error") and not r.get("infeasible")),
            "infeasible": sum(1 for r in evals if r.get("infeasible")),
            "cached": sum(1 for r in evals if r.get("cached")), "best": best, "curve": curve,
            "keys": list(evals[0]["values"]) if evals else [], "stages": final_stage,
            "generations": 1 + max((r.get("generation", 0) for r in evals), default=-1),
            "cost": total_cost(evals),
            "raced": sum(1 for r in evals if (r.get("race") or {}).get("stopped") and not r.get("cached"))}


def total_cost(evals: list[dict[str, Any]]) -> dict[str, float]:
    """Every candidate's recorded ``cost`` summed (forward tokens, tokens served from the prefix store, documents,
    seconds, ...)."""
    out: dict[str, float] = {}
    for r in evals:
        for k, v in (r.get("cost") or {}).items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0) + v
    return out


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fitness_axis(evals: list[dict[str, Any]]) -> str:
    """The plotted score's name: the objective itself when the fitness is minus one objective's value for every
    scored candidate, else minus the minimised fitness."""
    keys = {k for r in evals if math.isfinite(_fit(r)) for k in (r.get("objectives") or {})}
    if len(keys) == 1:
        (k,) = keys
        if all(abs(float(r["objectives"][k]) + _fit(r)) <= 1e-9 * max(1.0, abs(_fit(r)))
               for r in evals if math.isfinite(_fit(r))):
            return f"{k} (higher is better)"
    return "score = minus the minimised fitness (higher is better)"


def fitness_series(evals: list[dict[str, Any]]) -> tuple[list[int], list[float], list[int], list[float]]:
    """``(ids, scores, best ids, best so far)`` as :func:`plot_fitness` draws them: score = minus the fitness, so the
    best so far never falls within a stage (it restarts with each stage of a staged run)."""
    ids = [r["id"] for r in evals if math.isfinite(_fit(r))]
    fs = [-_fit(r) for r in evals if math.isfinite(_fit(r))]
    b, xs, ys, cur = math.inf, [], [], None
    for r in evals:
        if r.get("stage", 1) != cur:
            b, cur = math.inf, r.get("stage", 1)
        b = min(b, _fit(r))
        if math.isfinite(b):
            xs.append(r["id"])
            ys.append(-b)
    return ids, fs, xs, ys


def plot_fitness(evals: list[dict[str, Any]], out: Path) -> Path:
    """Every candidate's score and the best so far, by evaluation id; up is better (the score is minus the fitness
    the optimizer minimises: the objective itself for one maximised objective)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ids, fs, xs, ys = fitness_series(evals)
    ax.scatter(ids, fs, s=8, alpha=0.5, label="candidate")
    ax.step(xs, ys, where="post", color="C3", label="best so far")
    for r0, r1 in zip(evals, evals[1:], strict=False):
        if r0.get("stage", 1) != r1.get("stage", 1):
            ax.axvline(r1["id"] - 0.5, color="gray", ls="--", lw=1)
            ax.text(r1["id"], ax.get_ylim()[1], " stage 2", va="top", fontsize=8)
    failed = [r["id"] for r in evals if not math.isfinite(_fit(r))]
    if failed and fs:
        ax.scatter(failed, [min(fs)] * len(failed), marker="x", color="gray", s=12, label="failed / infeasible")
    ax.set_xlabel("evaluation id")
    ax.set_ylabel(_fitness_axis(evals))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _replace(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_pareto(evals: list[dict[str, Any]], keys: list[str], out: Path) -> Path | None:
    """Objective values (to minimise) of every successful candidate with the non-dominated ones marked; 2 objectives
    on one panel, 3 as the three pairwise panels."""
    from itertools import combinations

    import numpy as np

    from dfsmerge.optim import pareto_mask

    if not 2 <= len(keys) <= 3:
        return None
    rows = [r for r in evals if all(r["values"].get(k) is not None and math.isfinite(r["values"][k]) for k in keys)]
    if not rows:
        return None
    F = np.array([[r["values"][k] for k in keys] for r in rows])  # (n, n_obj)
    mask = pareto_mask(F)
    plt = _plt()
    pairs = list(combinations(range(len(keys)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        ax.scatter(F[~mask, i], F[~mask, j], s=8, alpha=0.4, label="candidate")
        order = np.argsort(F[mask, i])
        ax.plot(F[mask, i][order], F[mask, j][order], "o-", color="C3", ms=4, label="Pareto set")
        ax.set_xlabel(f"{keys[i]} (min)")
        ax.set_ylabel(f"{keys[j]} (min)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _replace(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def pool_layer_counts(path: dict[str, Any], ps: dict[str, Any] | None = None) -> dict[str, int]:
    """Decoder layer count of each model of a plan dict, read from the checkpoints' configs (``@ps``: the PS
    recipe's first model); models that cannot be read are left out."""
    from dfsmerge.genome import PS_MODEL_IN_PLAN
    from dfsmerge.io import open_checkpoint

    out = {}
    ps_src = None
    if ps:
        srcs = (ps.get("slices") or [{}])[0].get("sources") or ps.get("models") or []
        ps_src = srcs[0]["model"] if srcs else None
    for name, ref in path["models"].items():
        ref = ps_src if ref == PS_MODEL_IN_PLAN else ref
        try:
            out[name] = int(open_checkpoint(ref).config["num_hidden_layers"])
        except Exception:  # noqa: BLE001 - a model no longer on disk: draw the used layers only
            continue
    return out


def model_label(name: str, ref: str | None, names: dict[str, str] | None = None) -> str:
    """A model as the user wrote it: ``math (zoo:math)``, ``merged (PS merge)``; never a cache path."""
    if ref == "@ps":
        return f"{name} (PS merge)"
    written = (names or {}).get(name)
    return name if written in (None, name) else f"{name} ({written})"


def plot_path(path: dict[str, Any], out: Path, num_layers: dict[str, int] | None = None,
              names: dict[str, str] | None = None) -> Path:
    """The path, legible at real depth (30-60 steps and more). Left, top to bottom: a source-by-depth strip (one row
    per model, one column per step, the cell coloured by the step's model and labelled with its layer; a hatched cell
    repeats a layer already run, a ``>`` marks a skip forward within a model), the step scales with their running
    product, and the layer diagram (step on x, pool layer on y). Right: the networkx layer-path graph of
    :meth:`PathPlan.graph` (edge labels = transition counts). Models are named as the user wrote them (``names``:
    pool name -> config reference), never by cache path."""
    import networkx as nx
    from matplotlib.patches import Rectangle

    from dfsmerge.genome.plan import LayerRef, PathPlan, cumulative_scales

    plan = PathPlan.from_dict(path)
    models = list(plan.models)
    used = {m: 1 + max([s.layer.index for s in plan.steps if s.layer.model == m], default=0) for m in models}
    depth = {m: max(used[m], (num_layers or {}).get(m, 0)) for m in models}
    offsets, y = {}, 0
    for m in models:
        offsets[m] = y
        y += depth[m] + 1
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    labels = {m: model_label(m, plan.models[m], names) for m in models}
    plt = _plt()
    n_steps = len(plan.steps)
    big = y > 24 or n_steps > 24  # a real model's pool or path: smaller marks, sparser ticks
    width = max(9.0, min(0.5, 14 / max(n_steps, 1)) * n_steps + 6)
    strip_h, scale_h, diag_h = 0.35 * len(models) + 0.6, 1.6, max(3.0, 0.12 * y + 1.2)
    fig = plt.figure(figsize=(width, strip_h + scale_h + diag_h + 0.8))
    gs = fig.add_gridspec(3, 2, width_ratios=[2.2, 1], height_ratios=[strip_h, scale_h, diag_h])
    ax_s, ax_c, ax = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[2, 0])
    ax2 = fig.add_subplot(gs[:, 1])

    # source-by-depth strip
    seen: set[LayerRef] = set()
    last: dict[str, int] = {}
    for k, st in enumerate(plan.steps):
        m, i = st.layer.model, st.layer.index
        row = len(models) - 1 - models.index(m)
        ax_s.add_patch(Rectangle((k - 0.5, row - 0.45), 1, 0.9, facecolor=colors[m], edgecolor="white", lw=0.5,
                                 hatch="////" if st.layer in seen else None))
        txt = str(i) + (">" if m in last and i > last[m] + 1 else "")
        ax_s.text(k, row, txt, ha="center", va="center", fontsize=5 if n_steps > 40 else 6,
                  color="black" if st.layer in seen else "white", fontweight="bold")
        seen.add(st.layer)
        last[m] = i
    ax_s.set_xlim(-0.6, n_steps - 0.4)
    ax_s.set_ylim(-0.6, len(models) - 0.4)
    ax_s.set_yticks(range(len(models)))
    ax_s.set_yticklabels([labels[m] for m in reversed(models)], fontsize=7)
    ax_s.set_xticks([])
    ax_s.set_title(f"path: {n_steps} steps ({len(seen)} distinct layers, {n_steps - len(seen)} repeats); "
                   f"head/norm from {plan.base}, embedding from {plan.embed_model}", fontsize=9)
    for side in ("top", "right", "bottom"):
        ax_s.spines[side].set_visible(False)

    # scales and their running product (what the folded export divides the residual branch by)
    ks = list(range(n_steps))
    cum = cumulative_scales(plan.scales)
    ax_c.plot(ks, plan.scales, "o-", ms=2.5 if big else 4, lw=1, color="C3", label="step scale")
    ax_c.plot(ks, cum, "--", lw=1, color="gray", label="running product")
    ax_c.axhline(1.0, color="black", lw=0.5)
    ax_c.set_xlim(-0.6, n_steps - 0.4)
    ax_c.set_ylabel("scale", fontsize=8)
    ax_c.tick_params(labelsize=7)
    ax_c.set_xticks(range(0, n_steps, 1 if n_steps <= 40 else 5))
    ax_c.legend(fontsize=6, loc="best")

    # layer diagram
    ys = [offsets[s.layer.model] + s.layer.index for s in plan.steps]
    ax.plot(range(len(ys)), ys, color="lightgray", zorder=1)
    for k, (st, yy) in enumerate(zip(plan.steps, ys, strict=True)):
        ax.scatter([k], [yy], color=colors[st.layer.model], s=14 if big else 60, zorder=2)
        if not big and not math.isclose(st.scale, 1.0, abs_tol=5e-3):
            ax.annotate(f"×{st.scale:.2f}", (k, yy), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=7)
    tick_every = 1 if y <= 40 else 4
    ax.set_yticks([offsets[m] + i for m in models for i in range(depth[m]) if i % tick_every == 0])
    ax.set_yticklabels([f"{m}[{i}]" for m in models for i in range(depth[m]) if i % tick_every == 0],
                       fontsize=5 if big else 7)
    ax.set_xlabel("step")
    ax.set_xlim(-0.6, n_steps - 0.4)
    ax.set_xticks(range(0, len(ys), 1 if len(ys) <= 40 else 5))
    ax.set_ylim(-0.7, y - 1.3)  # every pool layer has a row, used or not
    for m in models:
        ax.scatter([], [], color=colors[m], label=labels[m])
    ax.legend(fontsize=7, loc="best")

    # layer-path graph
    g = plan.graph([LayerRef(m, i) for m in models for i in range(depth[m])])
    pos = {}
    for node in g.nodes:
        if isinstance(node, LayerRef):
            pos[node] = (models.index(node.model), -node.index)
    lo = min((q[1] for q in pos.values()), default=0)
    pos["embed"] = ((len(models) - 1) / 2, 1)
    pos["head"] = ((len(models) - 1) / 2, lo - 1)
    on_path = set(plan.layers)
    ncolor = [(colors.get(g.nodes[n]["model"], "C7") if n in on_path else "whitesmoke") if isinstance(n, LayerRef)
              else "white" for n in g.nodes]
    # nodes shrink with the pool so a 60-layer column does not overlap; big pools label layers by index only
    size = 300 if not big else max(40, int(5000 / max(y, 1)))
    nx.draw_networkx_nodes(g, pos, ax=ax2, node_color=ncolor, edgecolors="black", node_size=size,
                           linewidths=0.5 if big else 1.0)
    glabels = {n: (str(n.index) if big else str(n)) if isinstance(n, LayerRef) else n for n in g.nodes}
    nx.draw_networkx_labels(g, pos, ax=ax2, labels=glabels, font_size=4 if big else 6)
    nx.draw_networkx_edges(g, pos, ax=ax2, arrows=True, connectionstyle="arc3,rad=0.15", arrowsize=5 if big else 8,
                           node_size=size, width=0.6 if big else 1.0)
    nx.draw_networkx_edge_labels(g, pos, ax=ax2, edge_labels={e: g.edges[e]["count"] for e in g.edges
                                                              if g.edges[e]["count"] > 1}, font_size=6)
    ax2.set_title("layer-path graph", fontsize=9)
    ax2.axis("off")
    fig.tight_layout()
    _replace(Path(out), lambda tmp: fig.savefig(tmp, dpi=110, format=Path(out).suffix.lstrip(".") or "png"))
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ markdown
def _read_config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _significance_section(run: Path, evals: list[dict[str, Any]],
                          compute: Callable[[Path], Mapping[str, Any]] | None) -> list[str]:
    """The report's significance lines: computed now (``compute``) or read from a ``significance.json`` written for
    the current best; a run without task objectives has none."""
    from dfsmerge.report.significance import SIGNIFICANCE_FILE, significance_lines

    best = summarize(evals)["best"]
    if best is None:
        return []
    f = run / "report" / SIGNIFICANCE_FILE
    try:
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        if not any(o.get("type", "task") == "task" for o in (cfg or {}).get("objectives", [])):
            return []
        if compute is not None:
            sig = compute(run)
        elif f.is_file():
            sig = json.loads(f.read_text())
            if sig.get("best") != best["id"]:
                return [f"(`{SIGNIFICANCE_FILE}` was computed for candidate {sig.get('best')}, not the current best "
                        f"{best['id']}; it is rewritten when the search finishes)", ""]
        else:
            return []
        return significance_lines(sig, model_names(cfg or {}))
    except Exception as e:  # noqa: BLE001 - the report is still written; say why the tests are missing
        return [f"Significance not computed ({type(e).__name__}: {e}).", ""]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _describe(c: dict[str, Any]) -> str:
    parts = []
    if c.get("ps"):
        parts.append(f"PS {c['ps'].get('merge_method')}")
    if c.get("path"):
        steps = c["path"]["path"]
        parts.append(f"path {len(steps)}: " + " ".join(f"{s['model']}[{s['layer']}]" for s in steps[:12])
                     + (" …" if len(steps) > 12 else ""))
    if c.get("infeasible"):
        parts.append("infeasible")
    return "; ".join(parts)


def write_report(run_dir: str | Path, *, significance: Callable[[Path], Mapping[str, Any]] | None = None) -> Path:
    """Write ``RUN/report/`` (fitness.png, pareto.png, path.png, report.md) and return the report directory.

    Args:
        run_dir: the run directory.
        significance: computes the run's significance tests now, e.g.
            :func:`dfsmerge.analysis.ablation.run_significance` (rescores the best, the start and the sources, tests
            the best against each and writes ``significance.json``; ``functools.partial(run_significance,
            splits=(None, "test"))`` also tests on the test split); ``dfsmerge search`` does it in its final step.
            None: a ``significance.json`` of the same best is reported as it is. The report reads the run directory
            only, so rescoring, which loads models, is passed in by its caller.

    Raises:
        CheckpointError: ``run_dir`` is not a run directory.
    """
    run = Path(run_dir)
    evals = load_evals(run)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    sig_lines = _significance_section(run, evals, significance)
    s = summarize(evals)
    keys = s["keys"]
    images = []
    if evals:
        images.append(("Fitness", plot_fitness(evals, out / "fitness.png")))
        p = plot_pareto(evals, keys, out / "pareto.png") if len(keys) > 1 else None
        if p:
            images.append(("Objectives and Pareto set", p))
    best = s["best"]
    if best and (best.get("candidate") or {}).get("path"):
        cand = best["candidate"]
        images.append(("Best path", plot_path(cand["path"], out / "path.png",
                                              pool_layer_counts(cand["path"], cand.get("ps")),
                                              names=model_names(_read_config(run)))))
    cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    lines = [f"# Search report: `{run.name}`", ""]
    try:
        import yaml

        cfg = yaml.safe_load(cfg_text) or {}
        g, o = cfg.get("genome", {}), cfg.get("optimizer", {})
        lines += [f"- mode: **{g.get('mode')}**, models: {', '.join(m['name'] for m in g.get('models', []))}",
                  f"- optimizer: **{o.get('name')}** (popsize {o.get('popsize') or 'default'}), seed {cfg.get('seed')}"]
    except Exception:  # noqa: BLE001 - the report still works without a readable config
        pass
    lines += [f"- evaluations: {s['n']} ({s['cached']} cached duplicates, {s['failed']} failed, "
              f"{s['infeasible']} infeasible) in {s['generations']} generations",
              f"- best: {describe_best(best)} (eval id {best['id'] if best else '–'}; minimised fitness "
              f"{_fmt(_fit(best)) if best else '–'})"]
    c = s["cost"]
    if c:
        tok = c.get("forward_tokens", 0) + c.get("cached_tokens", 0)
        lines.append(f"- cost: {_fmt(c.get('forward_tokens', 0))} forward tokens computed, "
                     f"{_fmt(c.get('cached_tokens', 0))} served from the prefix store "
                     f"({100 * c.get('cached_tokens', 0) / tok if tok else 0:.1f}%), {int(c.get('docs', 0))} documents "
                     f"scored, {c.get('seconds', 0):.1f} s of evaluation")
    state = run / "state" / "state.json"
    ed = (json.loads(state.read_text()).get("eval_dtype") or {}) if state.is_file() else {}
    if ed.get("measured"):
        diff = ed.get("max_score_diff")
        lines.append(f"- scored in {ed['dtype']} (eval_dtype auto: bfloat16 measured at {ed['speedup']:.2f}x the speed "
                     f"of float32, scores within {'-' if diff is None else f'{diff:.3g}'} on {ed['candidates']} "
                     "candidates)")
    elif ed.get("dtype"):
        lines.append(f"- scored in {ed['dtype']}" + (f" (eval_dtype auto: {ed['rule']})" if ed.get("rule") else ""))
    lines.extend(_subset_lines(run))
    if s["raced"]:
        lines.append(f"- racing stopped {s['raced']} candidates early: their scores (marked `~`) are estimates on "
                     "part of the documents")
    lines.append("")
    if (run / "best").is_dir():
        lines += ["Best candidate files: " + ", ".join(f"[`best/{p.name}`](../best/{p.name})"
                                                       for p in sorted((run / "best").iterdir())), ""]
    if (run / "pareto.jsonl").is_file():
        n = len((run / "pareto.jsonl").read_text().splitlines())
        lines += [f"Pareto set: {n} candidates in [`pareto.jsonl`](../pareto.jsonl)", ""]
    if sig_lines:
        lines += ["## Is the best significantly better?", "", *sig_lines]
    lines += [f"## Best {TOP_K} candidates", ""]
    ranked = sorted((r for r in evals if math.isfinite(_fit(r)) and not r.get("cached")),
                    key=lambda r: (_fit(r), r["id"]))[:TOP_K]
    head = ["id", "gen", "fitness", *keys, "candidate"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        obj = r.get("objectives") or {}
        mark = "~" if (r.get("race") or {}).get("stopped") else ""
        lines.append("| " + " | ".join([str(r["id"]), str(r.get("generation")), mark + _fmt(_fit(r)),
                                        *(mark + _fmt(obj.get(k)) for k in keys),
                                        _describe(r.get("candidate") or {})]) + " |")
    lines.append("")
    errs = [r for r in evals if r.get("error") and not r.get("infeasible") and not r.get("cached")]
    if errs:
        lines += ["## Failed candidates", ""] + [f"- id {r['id']}: {r['error']}" for r in errs[:20]] + [""]
    for title, img in images:
        lines += [f"## {title}", "", f"![{title}]({img.name})", ""]
    _replace(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))
    return out


def _subset_lines(run: Path) -> list[str]:
    """Subset fitness (issue 26): how many scores are estimates, and the elite's estimated vs full-set scores."""
    path = run / "subset" / "rescored.jsonl"
    evals = run / "evals.jsonl"
    if not path.is_file() or not evals.is_file():
        return []
    n_est = sum(1 for line in evals.read_text().splitlines() if '"estimate":' in line)
    out = [f"- subset fitness: {n_est} candidates' scores are estimates from few documents; the elite rescored on "
           "every document (estimated -> full):"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        pairs = ", ".join(f"{k} {r['estimated'].get(k)} -> {v}" if not isinstance(v, float) or
                          not isinstance(r["estimated"].get(k), float) else
                          f"{k} {r['estimated'][k]:.4g} -> {v:.4g}" for k, v in (r.get("objectives") or {}).items())
        out.append(f"  - candidate {r['id']}: {pairs}")
    return out
