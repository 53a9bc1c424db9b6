"""Racing (dfsmerge.search.racing) on constructed rankings, and searches with racing and prefix reuse: prefix reuse
changes no score, racing marks what it stopped, costs are recorded, and SIGKILL + resume with both on equals an
uninterrupted run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from dfsmerge.objectives.config import ObjectiveConfig
from dfsmerge.objectives.tasks import block_ends
from dfsmerge.search import load_search_config, run_search
from dfsmerge.search.racing import Tally, run_race, score_interval
from tests.search.conftest import MC_TASK, read_evals, stable_evals
from tests.search.test_search_resume import search_with_kills


def _race(docs: np.ndarray, *, elite, bound="exact", delta=0.05, blocks=4, best_known=math.inf):
    """Race candidates whose per-document 0/1 scores are ``docs`` (P, n_tasks, N); every objective maximised."""
    P, K, N = docs.shape
    tallies = [Tally() for _ in range(P)]
    cuts = [b * N // blocks for b in range(blocks + 1)]
    calls = []

    def score_block(indices, block):
        calls.append((tuple(indices), block))
        lo, hi = cuts[block], cuts[block + 1]
        for i in indices:
            part = {f"t{k}": [float(docs[i, k, lo:hi].sum()), hi - lo, N, "maximize"] for k in range(K)}
            tallies[i].add(part, {}, {}, {"docs": K * (hi - lo)}, {})

    names = [f"t{k}" for k in range(K)]
    run_race(tallies, list(range(P)), score_block, n_blocks=blocks, bound=bound, delta=delta,
             objectives=[ObjectiveConfig(name=n) for n in names], elite=elite,
             best_known=best_known)
    return tallies, calls


def _full_fitness(docs):
    return -docs.mean(axis=2).sum(axis=1)  # (P,) minimised


@pytest.mark.parametrize("seed", range(20))
def test_exact_bound_never_stops_an_elite_member(seed):
    rng = np.random.default_rng(seed)
    P, N, mu = 12, 40, 6
    rates = rng.uniform(0, 1, size=P) ** 2  # many weak candidates, a few strong ones
    docs = (rng.uniform(size=(P, 2, N)) < rates[:, None, None]).astype(float)
    tallies, _ = _race(docs, elite=mu)
    full = _full_fitness(docs)
    for i, t in enumerate(tallies):
        if t.stopped:  # at least mu others are strictly better on the full documents
            assert (full < full[i]).sum() >= mu, (i, full)
            est = -sum(t.estimate().values())
            assert est >= full.min()  # never the best
        else:
            assert t.complete
            assert sum(t.estimate().values()) == pytest.approx(-full[i])


def test_racing_saves_documents_on_a_spread_out_generation():
    rng = np.random.default_rng(0)
    P, N = 12, 200
    rates = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.65] + [0.05] * 6)
    docs = (rng.uniform(size=(P, 1, N)) < rates[:, None, None]).astype(float)
    for bound in ("exact", "hoeffding", "kl"):
        tallies, _ = _race(docs, elite=6, bound=bound)
        stopped = [i for i, t in enumerate(tallies) if t.stopped]
        assert stopped and set(stopped) <= set(range(6, 12)), (bound, stopped)
        scored = sum(t.cost["docs"] for t in tallies)
        assert scored < P * N * (0.95 if bound == "exact" else 0.7), (bound, scored)


@pytest.mark.parametrize("bound", ["hoeffding", "kl"])
@pytest.mark.parametrize("seed", range(10))
def test_confidence_bounds_keep_the_elite_on_clear_gaps(seed, bound):
    rng = np.random.default_rng(100 + seed)
    P, N = 12, 400
    rates = np.concatenate([rng.uniform(0.6, 0.9, 4), rng.uniform(0.0, 0.2, 8)])
    docs = (rng.uniform(size=(P, 1, N)) < rates[:, None, None]).astype(float)
    tallies, _ = _race(docs, elite=4, bound=bound)
    assert all(not tallies[i].stopped for i in range(4))
    assert sum(t.stopped for t in tallies[4:]) >= 4


@pytest.mark.parametrize("seed", range(10))
def test_non_dominated_set_is_never_stopped(seed):
    rng = np.random.default_rng(200 + seed)
    P, N = 10, 60
    rates = rng.uniform(0, 1, size=(P, 2)) ** 2
    docs = (rng.uniform(size=(P, 2, N)) < rates[:, :, None]).astype(float)
    tallies, _ = _race(docs, elite=None)
    full = -docs.mean(axis=2)  # (P, 2) minimised
    for i, t in enumerate(tallies):
        if t.stopped:
            assert any(np.all(full[j] <= full[i]) and np.any(full[j] < full[i]) for j in range(P) if j != i)


def test_a_stopped_estimate_better_than_the_best_is_completed():
    # candidate 0 starts perfect and collapses (Hoeffding's bound fails at delta 0.5); candidate 1 is steady at 0.5,
    # stopped after the first block, yet its estimate beats candidate 0's final score: racing must not decide the best
    N = 40
    docs = np.zeros((2, 1, N))
    docs[0, 0, :10] = 1.0
    docs[1, 0, :] = np.arange(N) % 2 == 0
    stopped_plain = _race(docs, elite=1, bound="hoeffding", delta=0.5, blocks=4)[0]
    assert stopped_plain[1].complete and not stopped_plain[1].stopped
    assert len(stopped_plain[1].blocks) == 4  # it was scored to the end after the race
    full = _full_fitness(docs)
    assert full[1] < full[0]


def test_block_ends_on_batch_boundaries_by_hand():
    # 300 documents, 4 blocks, batches of 16: even ends 75, 150, 225 move to 5, 9 and 14 batches
    assert block_ends(300, 4, 16) == [80, 144, 224, 300]
    assert block_ends(300, 4, 25) == [75, 150, 225, 300]  # already on batch boundaries
    assert block_ends(40, 4, 16) == [10, 20, 30, 40]  # aligned ends 16, 16, 32 would leave a block empty: even split


@pytest.mark.parametrize("n", [1, 4, 7, 40, 60, 99, 300, 1069])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 16, 25, 64])
def test_block_ends_split_every_document_once_and_add_no_batches_when_aligned(n, k, batch):
    k = min(k, n)
    ends = block_ends(n, k, batch)
    starts = [0, *ends[:-1]]
    assert len(ends) == k and ends[-1] == n and all(lo < hi for lo, hi in zip(starts, ends, strict=True))
    if ends != [(b + 1) * n // k for b in range(k)]:  # moved: every inner end on a batch boundary
        assert all(e % batch == 0 for e in ends[:-1])
    if all(e % batch == 0 for e in ends[:-1]):
        assert sum(math.ceil((hi - lo) / batch) for lo, hi in zip(starts, ends, strict=True)) == math.ceil(n / batch)


def test_score_interval_contains_every_completion():
    rng = np.random.default_rng(0)
    for _ in range(200):
        N = int(rng.integers(1, 30))
        x = (rng.uniform(size=N) < rng.uniform()).astype(float)
        n = int(rng.integers(0, N + 1))
        lo, hi = score_interval(x[:n].sum(), n, N, "exact", 0.05)
        assert lo - 1e-12 <= x.mean() <= hi + 1e-12


def _bernoulli_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log(p / q), 0.0)
        b = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - q)), 0.0)
    return a + b


def test_kl_interval_ends_where_the_chernoff_bound_reaches_its_level():
    # each end is the exact interval's, the Hoeffding-Serfling one's (at delta / 2), or the point where
    # n * kl(m, q) = ln(4 / delta) (computed here with numpy, independently of the bisection)
    rng = np.random.default_rng(1)
    for _ in range(300):
        N = int(rng.integers(20, 500))
        n = int(rng.integers(1, N))
        s = float(rng.binomial(n, rng.uniform() ** 3))
        delta = float(rng.uniform(1e-5, 0.2))
        lo, hi = score_interval(s, n, N, "kl", delta)
        m = s / n
        ex_lo, ex_hi = s / N, (s + N - n) / N
        eps = math.sqrt((1 - (n - 1) / N) * math.log(4 / delta) / (2 * n))
        level = math.log(4 / delta) / n
        for end, cap, side in ((lo, max(ex_lo, m - eps), -1), (hi, min(ex_hi, m + eps), 1)):
            assert (end - cap) * side <= 1e-12
            if abs(end - cap) > 1e-9:  # the Chernoff limit is the binding one
                assert _bernoulli_kl(np.float64(m), np.float64(end)) == pytest.approx(level, rel=1e-6, abs=1e-9)
            # the limit is tight: a little farther out, kl exceeds the level (or [0, 1] ends)
            beyond = end + side * 1e-6
            if 0 < beyond < 1 and abs(end - cap) > 1e-9:
                assert _bernoulli_kl(np.float64(m), np.float64(beyond)) > level


@pytest.mark.parametrize("bound", ["hoeffding", "kl"])
def test_confidence_bounds_cover_the_final_score(bound):
    # the first n documents of a random order (sampling without replacement, as the race's fixed shuffle): the
    # final mean lies inside the interval in at least 1 - delta of the draws, for 0/1 and for continuous scores
    rng = np.random.default_rng(2)
    delta, misses, trials = 0.1, 0, 3000
    for t in range(trials):
        N = int(rng.integers(10, 300))
        rate = rng.uniform() ** 2 if t % 4 < 2 else rng.uniform(0.2, 0.8)
        pop = (rng.uniform(size=N) < rate).astype(float) if t % 2 else rng.beta(rate + 0.05, 1.0, size=N)
        order = rng.permutation(N)
        n = int(rng.integers(1, N)) if t % 4 < 2 else int(rng.integers(int(0.6 * N), N))  # late blocks too
        lo, hi = score_interval(float(pop[order[:n]].sum()), n, N, bound, delta)
        misses += not (lo - 1e-12 <= pop.mean() <= hi + 1e-12)
    assert misses <= delta * trials, misses


def test_kl_is_tighter_than_hoeffding_for_weak_candidates():
    # the point of the kl bound: a candidate near 0 is bounded far more tightly (a search's weak candidates)
    for n, s in ((75, 0), (75, 1), (150, 2)):
        _, hi_h = score_interval(s, n, 300, "hoeffding", 0.001)
        _, hi_k = score_interval(s, n, 300, "kl", 0.001)
        assert hi_k < 0.75 * hi_h, (n, s, hi_k, hi_h)


# ---------------------------------------------------------------- searches
@pytest.fixture
def mc_config(make_config, mc_task_dir):
    def make(mode="dfs", **extra):  # coarse log-scale steps: neighbouring candidates share path prefixes
        return make_config(mode, "cma", popsize=6, max_evals=18, task_paths=[str(mc_task_dir)],
                           objectives=[{"name": MC_TASK, "split": "validation", "native": True}],
                           dfs={"repetitions": 2, "max_length": 4, "scale_step": 0.5}, **extra)
    return make


def _scores(recs):
    return [(r["id"], r["key"], r["objectives"], r["fitness"]) for r in recs]


@pytest.mark.parametrize("mode", ["dfs", "joint"])
def test_prefix_reuse_changes_no_score_and_saves_forward_tokens(mc_config, tmp_path, mode):
    runs = {}
    for on in (False, True):
        cfg = load_search_config(mc_config(mode, prefix_cache={"enabled": on}))
        run_search(cfg, tmp_path / f"{mode}_{on}", progress=False)
        runs[on] = read_evals(tmp_path / f"{mode}_{on}")
    assert _scores(runs[True]) == _scores(runs[False])
    fresh = [r for r in runs[True] if not r["cached"] and "cost" in r]
    assert fresh and all(r["cost"]["docs"] == 10 for r in fresh)
    on_tok = sum(r["cost"]["forward_tokens"] for r in fresh)
    off_tok = sum(r["cost"]["forward_tokens"] for r in runs[False] if "cost" in r)
    assert sum(r["cost"]["tokens"] for r in fresh) == pytest.approx(off_tok)
    assert on_tok + sum(r["cost"]["cached_tokens"] for r in fresh) == pytest.approx(off_tok)
    if mode == "dfs":  # joint: the merged model's layers change with every candidate, so its paths rarely share
        assert on_tok < off_tok


class _TableBackend:
    """Scores from a constructed table: candidate x answers document d right iff u(x, d) < rate(x), with rate(x)
    spread from 0 to 1 by the first gene (so a generation holds clearly good and clearly bad candidates)."""

    name = "table"
    N = 40

    def __init__(self, key, blocks):
        self.key, self.blocks, self.calls = key, blocks, []

    def set_stage(self, stage, fixed):
        pass

    def _docs(self, x):
        rate = 1 / (1 + math.exp(-8 * (float(x[0]) - 0.5)))  # x[0] starts at 0.5: rates around 1/2
        u = np.random.default_rng(abs(hash(np.asarray(x).tobytes())) % 2**32).uniform(size=self.N)
        return (u < rate).astype(float)

    def evaluate(self, genomes, candidates=None, block=None):
        from dfsmerge.objectives.evaluator import EvalResult

        cuts = [b * self.N // self.blocks for b in range(self.blocks + 1)]
        for i, x in enumerate(genomes):
            self.calls.append(block)
            d = self._docs(x)[cuts[block]:cuts[block + 1]]
            m = float(d.mean())
            yield i, EvalResult(results={}, scores={self.key: m}, values={self.key: -m}, fitness=-m,
                                partial={self.key: [float(d.sum()), len(d), self.N, "maximize"]},
                                cost={"docs": len(d)})

    def close(self):
        pass


def test_racing_search_marks_partial_candidates(mc_config, tmp_path):
    cfg = mc_config("ps", racing={"enabled": True, "blocks": 4, "bound": "exact"}, budget={"max_evals": 36},
                    eval_dtype="float32")  # the table has no dtype to measure
    cfg = load_search_config({**cfg, "optimizer": {"name": "cma", "popsize": 12, "sigma0": 0.5}})
    backend = _TableBackend(cfg.objectives[0].key, 4)
    res = run_search(cfg, tmp_path / "run", progress=False, backend=backend)
    recs = read_evals(tmp_path / "run")
    raced = [r for r in recs if r.get("race") and not r["cached"]]
    assert len(raced) == len([r for r in recs if not r["cached"]]) > 0
    stopped = [r for r in raced if r["race"]["stopped"]]
    assert stopped, "no candidate was stopped on a spread-out table"
    assert len(backend.calls) < 4 * len(raced)  # blocks were saved
    for r in raced:
        assert r["cost"]["docs"] == r["race"]["docs"] == sum(b[cfg.objectives[0].key][1] for b in r["race"]["blocks"])
        if not r["race"]["stopped"]:
            assert r["race"]["docs"] == 40
    for gen in {r["generation"] for r in raced}:  # the exact bound: a stopped one is outside its generation's elite
        g = [r for r in recs if r["generation"] == gen]
        full = {r["id"]: -float(backend._docs(r["genome"]).mean()) for r in g}
        for r in g:
            if r.get("race", {}).get("stopped"):
                assert sum(full[o] < full[r["id"]] for o in full if o != r["id"]) >= 6  # CMA-ES mu of 12
    assert not res.best.get("race", {}).get("stopped")
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"racing stopped {len(stopped)} candidates early" in report
    assert f"{sum(r['cost']['docs'] for r in recs if 'cost' in r)} documents scored" in report


def test_racing_keeps_each_candidates_merge_between_blocks(mc_config, tmp_path, monkeypatch):
    # joint mode: each candidate is merged once, its weights copied back for its later blocks; the records equal a
    # run that merges again for every block
    import dfsmerge.merge

    calls = []
    real = dfsmerge.merge.merge_tensor

    def counting(*a, **k):
        calls.append(k.get("name"))
        return real(*a, **k)

    monkeypatch.setattr(dfsmerge.merge, "merge_tensor", counting)
    runs, merged = {}, {}
    for keep in (0, 2048):
        calls.clear()
        cfg = load_search_config(mc_config("joint", racing={"enabled": True, "blocks": 3, "bound": "kl", "delta": 0.5,
                                                            "keep_merged_mb": keep}, eval_dtype="float32"))
        run_search(cfg, tmp_path / f"k{keep}", progress=False)
        runs[keep] = stable_evals(tmp_path / f"k{keep}")
        merged[keep] = len(calls)
    assert runs[0] == runs[2048]
    fresh = [r for r in runs[0] if not r["cached"]]
    blocks = sum(len(r["race"]["blocks"]) for r in fresh)
    per_merge = merged[2048] // len(fresh)  # tensors merged per candidate
    assert merged[2048] == per_merge * len(fresh)
    assert merged[0] == per_merge * blocks > merged[2048]


def test_racing_refuses_lm_eval_objectives(mc_config, tmp_path):
    from dfsmerge.errors import ConfigError

    cfg = mc_config("dfs", racing={"enabled": True})
    cfg["objectives"] = [{"name": MC_TASK, "split": "validation", "native": False}]
    with pytest.raises(ConfigError, match="racing"):
        run_search(load_search_config(cfg), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_sigkill_resume_with_racing_and_prefix_reuse_equals_uninterrupted(mc_config, tmp_path):
    cfg = mc_config("staged", racing={"enabled": True, "blocks": 3, "bound": "hoeffding", "delta": 0.5},
                    budget={"max_evals": 12}, eval_dtype="float32")  # auto's choice is timed: each run may differ
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "ref", tmp_path / "run"
    search_with_kills(cfg_path, ref, run, [("after_append", 2), ("before_state", 3), ("before_append", 5),
                                           ("after_state", 2)], timeout=600)
    # cost (dropped by strip_volatile) differs: each process's prefix store starts empty
    assert stable_evals(run) == stable_evals(ref)
