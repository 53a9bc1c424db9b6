"""How many documents racing can save on a search's own generations (issue 18): an upper bound and a simulation.

Reads the ``plain`` runs of ``benchmarks/search_cost.py`` (``runs/search_cost/*-plain/evals.jsonl``: every candidate
scored on every document). For each generation it takes the candidates' final scores and

- ``oracle``: stops every candidate outside the elite (CMA-ES's mu best) after its first block, the most any race
  can save: ``(mu + (lambda - mu) / blocks) / lambda`` of the documents;
- ``kl`` / ``hoeffding``: races per-document 0/1 outcomes drawn with those scores as rates (the runs keep no
  per-document results) through :func:`dfsmerge.search.racing.run_race` with delta 0.05 per generation.

Printed: documents in all / documents scored (x fewer), per run and bound.

    python benchmarks/racing_ceiling.py [--workdir runs/search_cost] [--blocks 4,8] [--draws 5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfsmerge.objectives.config import ObjectiveConfig  # noqa: E402
from dfsmerge.search.racing import Tally, run_race  # noqa: E402


def generations(run: Path) -> list[list[float]]:
    """Each generation's fresh candidates' first objective score (failed candidates score 0)."""
    gens: dict[tuple, list[float]] = {}
    for line in (run / "evals.jsonl").open():
        r = json.loads(line)
        if r.get("cached"):
            continue
        v = next(iter(r["objectives"].values()))
        gens.setdefault((r["stage"], r["generation"]), []).append(0.0 if v is None else float(v))
    return list(gens.values())


def race_docs(scores: np.ndarray, docs: int, blocks: int, bound: str, mu: int, rng) -> int:
    """Documents a race scores on one simulated generation."""
    outcomes = (rng.uniform(size=(len(scores), docs)) < scores[:, None]).astype(float)
    cuts = [b * docs // blocks for b in range(blocks + 1)]
    tallies = [Tally() for _ in scores]

    def score_block(indices, block):
        lo, hi = cuts[block], cuts[block + 1]
        for i in indices:
            tallies[i].add({"t": [float(outcomes[i, lo:hi].sum()), hi - lo, docs, "maximize"]}, {}, {},
                           {"docs": hi - lo}, {})

    run_race(tallies, list(range(len(scores))), score_block, n_blocks=blocks, bound=bound, delta=0.05,
             objectives=[ObjectiveConfig(name="t")], elite=mu, best_known=math.inf)
    return int(sum(t.cost["docs"] for t in tallies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "runs/search_cost"))
    ap.add_argument("--blocks", default="4,8")
    ap.add_argument("--draws", type=int, default=5, help="simulated outcome tables per generation")
    ap.add_argument("--docs", type=int, default=300, help="documents per candidate (the toy configs' limit)")
    args = ap.parse_args()
    print("| run | blocks | oracle | kl | hoeffding |\n|---|---|---|---|---|")
    for run in sorted(Path(args.workdir).glob("*-plain")):
        if run.name.startswith("real"):
            continue  # 16 candidates: two generations, too few to say anything
        gens = generations(run)
        for blocks in (int(b) for b in args.blocks.split(",")):
            total = sum(len(g) for g in gens) * args.docs
            oracle = sum(len(g) // 2 * args.docs + (len(g) - len(g) // 2) * args.docs // blocks for g in gens)
            cells = [f"{total / oracle:.2f}x"]
            for bound in ("kl", "hoeffding"):
                rng = np.random.default_rng(0)
                scored = sum(race_docs(np.asarray(g), args.docs, blocks, bound, len(g) // 2, rng)
                             for g in gens for _ in range(args.draws)) / args.draws
                cells.append(f"{total / scored:.2f}x")
            print(f"| {run.name.removesuffix('-plain')} | {blocks} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
