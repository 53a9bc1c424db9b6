"""Optimizer ``llm`` (EvoLLM with LLM-Evo-Merge's sigma rule) against a real local HTTP server speaking the OpenAI
chat-completions protocol (tests/optim/chat_server.py), through the ordinary ``openai`` client: the prompt, parsing
and clipping, the sigma rule, faults (garbage, HTTP 500, timeouts) falling back to the elite's mean, preflight
errors, the local transformers backend, searches in every genome mode, and SIGKILL + ``--resume`` equal to an
uninterrupted run with no repeated LLM call."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from dfsmerge.errors import CheckpointError, ConfigError
from dfsmerge.optim import make_optimizer
from dfsmerge.optim.llm import LOG_NAME, parse_mean
from tests.optim.chat_server import ChatServer, Reply, llm_options, shown, toward
from tests.search.conftest import make_config, read_evals, tiny_models  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]
LO, HI = -2.0, 3.0


def _make(server, *, dim=6, popsize=6, seed=3, x0=None, binary=None, **options):
    return make_optimizer("llm", dim=dim, bounds=(np.full(dim, LO), np.full(dim, HI)), x0=x0, seed=seed,
                          popsize=popsize, binary_mask=binary, **llm_options(server, **options))


def _sphere(X):  # noqa: N803
    return ((X - 1.3) ** 2).sum(1)


def _log(run_dir: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (Path(run_dir) / LOG_NAME).read_text().splitlines()]
    return [r for r in recs if kind is None or r["kind"] == kind]


def _top_k(told: list[tuple[np.ndarray, np.ndarray]], k: int):
    """Reference: the k best distinct (genome, fitness) pairs told so far, best first (ties: first told)."""
    seen: dict[tuple, float] = {}
    for X, F in told:
        for x, f in zip(X, F, strict=True):
            seen.setdefault(tuple(x), float(f))
    items = sorted(seen.items(), key=lambda kv: kv[1])[:k]  # stable: first told wins ties
    return np.array([x for x, _ in items]), np.array([f for _, f in items])


# ---- parsing -------------------------------------------------------------------------------------------------
def test_parse_mean_reads_json_fences_and_prose():
    x = np.array([0.25, -1.5, 2.0])
    assert np.array_equal(parse_mean(json.dumps({"mean": x.tolist()}), 3), x)
    assert np.array_equal(parse_mean("```json\n" + json.dumps(x.tolist()) + "\n```", 3), x)
    assert np.array_equal(parse_mean('{"thought": "t", "mean_genome": [[0.25], [-1.5], [2.0]]}', 3), x)
    prose = "Shown: [1, 2]. I propose the mean [0.25, -1.5, 2e0] because it is central."
    assert np.array_equal(parse_mean(prose, 3), x)
    with pytest.raises(ValueError, match="no list of 3 numbers"):
        parse_mean('{"mean": [1, 2]}', 3)
    with pytest.raises(ValueError, match="no list of 3 numbers"):
        parse_mean("I cannot help with that.", 3)
    with pytest.raises(ValueError, match="non-finite"):
        parse_mean('{"mean": [1, NaN, 2]}', 3)


# ---- prompt, clipping, sigma ---------------------------------------------------------------------------------
def test_prompt_shows_top_k_sorted_worst_to_best_rounded():
    with ChatServer(toward(1.0)) as server:
        opt = _make(server, top_k=4, digits=2, fitness_scale=100.0)
        told = []
        for _ in range(3):
            X = opt.ask()
            F = _sphere(X)
            told.append((X, F))
            opt.tell(X, F)
        opt.ask()
        assert len(server.requests) == 3  # generations 1-3 (generation 0 has nothing to show)
        gen, xs, fs = shown(server.requests[-1])
        assert gen == 3
        ref_x, ref_f = _top_k(told, 4)
        assert fs == [round(f * 100.0) for f in ref_f[::-1]]  # worst first, best last, integers
        assert np.array_equal(np.array(xs), np.round(ref_x[::-1], 2))
        user = server.requests[-1]["messages"][1]["content"]
        assert user.startswith(f"Variables: x1-x6 in [{LO:g}, {HI:g}].")
        assert server.requests[-1]["model"] == "scripted" and server.requests[-1]["temperature"] == 0.0


def test_proposal_is_clipped_and_sigma_follows_improvement():
    far = [HI + 5.0, LO - 5.0, 100.0, 0.5, -100.0, 1.0]
    with ChatServer(lambda body: Reply(json.dumps({"mean": far}))) as server:
        opt = _make(server, popsize=400, sigma_low=0.05, sigma_high=0.2)
        X = opt.ask()
        assert opt.last_proposal["source"] == "start" and opt.last_proposal["sigma"] == 0.2
        opt.tell(X, _sphere(X))  # first finite fitness: an improvement
        X = opt.ask()
        p = opt.last_proposal
        assert p["source"] == "llm" and p["sigma"] == 0.05
        assert p["mean"] == np.clip(far, LO, HI).tolist()
        assert ((X >= LO) & (X <= HI)).all()
        inner = np.array([3, 5])  # genes whose mean is inside the box: spread = sigma * range
        std = (X[:, inner] - np.array(far)[inner]).std(axis=0)
        assert np.allclose(std, 0.05 * (HI - LO), rtol=0.15), std
        opt.tell(X, np.full(len(X), 1e6))  # no improvement
        opt.ask()
        assert opt.last_proposal["sigma"] == 0.2
        opt.tell(opt.ask(), np.full(400, 1e6))  # equal is not better
        opt.ask()
        assert opt.last_proposal["sigma"] == 0.2


def test_binary_genes_are_shown_as_their_values():
    with ChatServer(lambda body: Reply(json.dumps({"mean": [1.0, -1.0, 0.3, 0.7]}))) as server:
        binary = np.array([True, True, False, False])
        opt = make_optimizer("llm", dim=4, bounds=(-1.0, 1.0), seed=0, popsize=8, binary_mask=binary,
                             **llm_options(server))
        for _ in range(3):
            X = opt.ask()
            assert np.isin(X[:, :2], [-1.0, 1.0]).all()
            opt.tell(X, (X**2).sum(1))
        user = server.requests[-1]["messages"][1]["content"]
        assert user.startswith("Variables: x1-x2 either -1 or 1; x3-x4 in [-1, 1].")
        _, xs, _ = shown(server.requests[-1])
        assert all(v in (-1.0, 1.0) for x in xs for v in x[:2])


# ---- faults --------------------------------------------------------------------------------------------------
def test_garbage_http500_and_timeout_fall_back_and_are_logged(tmp_path):
    seen: Counter = Counter()

    def respond(body):
        gen, xs, _ = shown(body)
        key = json.dumps(body["messages"])
        seen[key] += 1
        good = Reply(json.dumps({"mean": xs[-1]}))
        if gen == 1:  # garbage, then a good answer to the correction
            return good if len(body["messages"]) == 4 else Reply("Sure! Here is a great genome for you.")
        if gen == 2:
            return Reply(status=500)
        if gen == 3:  # slower than the timeout once
            return Reply(good.content, delay=1.5) if seen[key] == 1 else good
        return good

    with ChatServer(respond) as server:
        opt = _make(server, max_retries=2, timeout=0.5, top_k=3)
        opt.bind_run_dir(tmp_path)
        told = []
        for g in range(5):
            X = opt.ask()
            p = opt.last_proposal
            if g == 1:
                assert p["source"] == "llm"
                fix = server.requests[1]["messages"]
                assert fix[2] == {"role": "assistant", "content": "Sure! Here is a great genome for you."}
                assert "could not be used" in fix[3]["content"]
            if g == 2:
                ref_x, _ = _top_k(told, 3)
                assert p["source"] == "fallback" and "500" in p["error"]
                assert np.allclose(p["mean"], ref_x.mean(axis=0), rtol=0, atol=1e-12)
            if g == 3:
                assert p["source"] == "llm"
            F = _sphere(X)
            told.append((X, F))
            opt.tell(X, F)
        calls = _log(tmp_path, "call")
        by_gen = Counter(c["generation"] for c in calls)
        assert by_gen == {1: 2, 2: 3, 3: 2, 4: 1}
        errors = [c["error"] for c in calls if c["error"]]
        assert sum("InternalServerError" in e for e in errors) == 3
        assert sum("Timeout" in e for e in errors) == 1
        assert [r["source"] for r in _log(tmp_path, "proposal")] == ["start", "llm", "fallback", "llm", "llm"]
        assert len(server.requests) == 8


def test_unreachable_endpoint_falls_back_every_generation(tmp_path):
    with ChatServer(toward(0.0)) as server:
        url = server.base_url
    opt = make_optimizer("llm", dim=3, bounds=(0.0, 1.0), seed=0, popsize=4, model="m", base_url=url,
                         api_key_env=None, max_retries=1, backoff=0.0, timeout=2.0)
    for _ in range(3):
        X = opt.ask()
        opt.tell(X, X.sum(1))
    assert opt.last_proposal["source"] == "fallback" and "Connection" in opt.last_proposal["error"]


# ---- resume --------------------------------------------------------------------------------------------------
def test_resume_replays_logged_answers_without_calling(tmp_path):
    with ChatServer(toward(1.3)) as server:
        ref, states = [], {}
        opt = _make(server)
        opt.bind_run_dir(tmp_path / "a")
        (tmp_path / "a").mkdir(exist_ok=True)
        for g in range(5):
            if g == 3:
                states["told"] = opt.state_dict()  # killed after tell ... and after the next LLM answer was logged
            X = opt.ask()
            if g == 2:
                states["asked"] = opt.state_dict()  # killed mid-generation
            ref.append(X)
            opt.tell(X, _sphere(X))
        n_calls = len(server.requests)
        for phase, g0 in (("asked", 2), ("told", 3)):
            opt2 = _make(server)
            opt2.bind_run_dir(tmp_path / "a")
            opt2.load_state_dict(json.loads(json.dumps(states[phase])))
            for g in range(g0, 5):
                X = opt2.ask()
                assert np.array_equal(X, ref[g]), f"{phase}: generation {g}"
                opt2.tell(X, _sphere(X))
            assert len(server.requests) == n_calls, f"{phase}: a logged answer was requested again"
        # the pending generation's attempts travel in the state too: no run directory needed for that replay
        opt3 = _make(server)
        opt3.load_state_dict(json.loads(json.dumps(states["asked"])))
        assert np.array_equal(opt3.ask(), ref[2]) and len(server.requests) == n_calls


def test_resume_refuses_a_log_with_another_prompt(tmp_path):
    with ChatServer(toward(1.3)) as server:
        opt = _make(server)
        opt.bind_run_dir(tmp_path)
        X = opt.ask()
        opt.tell(X, _sphere(X))
        state = opt.state_dict()
        opt.ask()
        lines = (tmp_path / LOG_NAME).read_text().splitlines()
        rec = json.loads(lines[-2])  # the generation-1 call (the last line is its proposal)
        assert rec["kind"] == "call"
        rec["messages"][1]["content"] += " (edited)"
        lines[-2] = json.dumps(rec)
        (tmp_path / LOG_NAME).write_text("\n".join(lines) + "\n")
        opt2 = _make(server)
        opt2.bind_run_dir(tmp_path)
        opt2.load_state_dict(state)
        with pytest.raises(CheckpointError, match="differs"):
            opt2.ask()


# ---- preflight and config ------------------------------------------------------------------------------------
def test_preflight_errors_are_one_line(monkeypatch):
    from dfsmerge.optim import validate_options

    with ChatServer(toward(0.0), api_key="sk-test-secret") as server:
        opts = validate_options("llm", model="scripted", base_url=server.base_url, api_key_env="DFS_TEST_KEY")
        monkeypatch.delenv("DFS_TEST_KEY", raising=False)
        with pytest.raises(ConfigError, match="api_key_env='DFS_TEST_KEY'.*not set") as e:
            opts.preflight()
        monkeypatch.setenv("DFS_TEST_KEY", "sk-wrong")
        with pytest.raises(ConfigError, match="rejected the key in DFS_TEST_KEY") as e2:
            opts.preflight()
        monkeypatch.setenv("DFS_TEST_KEY", "sk-test-secret")
        opts.preflight()
        url = server.base_url
    with pytest.raises(ConfigError, match="unreachable") as e3:
        validate_options("llm", model="m", base_url=url, api_key_env=None).preflight()
    for err in (e, e2, e3):
        msg = str(err.value)
        assert "\n" not in msg and "sk-" not in msg
    validate_options("cma").preflight()  # every optimizer has one


def test_flat_config_form_and_refused_key(make_config):  # noqa: F811
    from dfsmerge.search import load_search_config

    d = make_config("ps", "cma")
    d["optimizer"] = {"name": "llm", "popsize": 4, "backend": "openai", "llm_model": "gpt-4o-mini",
                      "base_url": "http://127.0.0.1:1/v1", "sigma_low": 0.01, "sigma_high": 0.3, "top_k": 5}
    cfg = load_search_config(d)
    assert cfg.optimizer.options == {"backend": "openai", "llm_model": "gpt-4o-mini",
                                     "base_url": "http://127.0.0.1:1/v1", "sigma_low": 0.01, "sigma_high": 0.3,
                                     "top_k": 5}
    assert load_search_config(cfg.to_dict()) == cfg
    d["optimizer"] = {"name": "llm", "model": "m", "api_key": "sk-secret-123"}
    with pytest.raises(ConfigError, match="api_key is refused") as e:
        load_search_config(d)
    assert "sk-secret" not in str(e.value)
    d["optimizer"] = {"name": "llm", "model": "m", "sigma_low": 0.5, "sigma_high": 0.1}
    with pytest.raises(ConfigError, match="sigma_low=0.5 > sigma_high=0.1"):
        load_search_config(d)


# ---- searches ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ps", "dfs", "staged", "joint"])
def test_search_every_mode(mode, make_config, tmp_path):  # noqa: F811
    from dfsmerge.search import load_search_config, run_search
    from dfsmerge.search.space import binary_mask, build_space

    with ChatServer(toward(0.5)) as server:
        d = make_config(mode, "llm", popsize=4, max_evals=12)
        d["optimizer"] = {"name": "llm", "popsize": 4, **llm_options(server)}
        cfg = load_search_config(d)
        run = tmp_path / "run"
        res = run_search(cfg, run, progress=False)
    evals = read_evals(run)
    assert res.n_evals == len(evals) == (24 if mode == "staged" else 12)
    proposals = _log(run, "proposal")
    assert len({p["stream"] for p in proposals}) == (2 if mode == "staged" else 1)
    assert all(p["source"] == ("start" if p["generation"] == 0 else "llm") for p in proposals), proposals
    assert len(server.requests) == len(_log(run, "call")) == sum(p["generation"] > 0 for p in proposals)
    if mode in ("dfs", "joint"):  # indicator genes reach the loop as their lo/hi values
        space, _ = build_space(cfg)
        b = np.asarray(binary_mask(space))
        lo, hi = space.bounds
        G = np.array([r["genome"] for r in evals])
        assert ((G[:, b] == np.asarray(lo)[b]) | (G[:, b] == np.asarray(hi)[b])).all()
    assert all(math.isfinite(r["fitness"]) for r in evals if not r["error"])


KILLER = textwrap.dedent('''
    import os, signal, sys
    from dfsmerge.optim import llm as L
    from dfsmerge.search import state as S
    from dfsmerge.search.loop import Search
    where, k = sys.argv[1], int(sys.argv[2])
    n = {"c": 0}
    cls, name = {"llm_log": (L._Log, "append"), "append_eval": (S.RunDir, "append_eval"),
                 "before_state": (S.RunDir, "write_state"), "after_state": (S.RunDir, "write_state")}[where]
    orig = getattr(cls, name)
    def f(self, arg):
        n["c"] += 1
        if n["c"] == k and where == "before_state":
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, arg)
        if n["c"] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    setattr(cls, name, f)
    from dfsmerge.cli import main
    sys.exit(main(sys.argv[3:]))
''')
VOLATILE = {"time", "timings", "seconds"}


def _faulty_responder():
    """Deterministic in the prompt: generation 2 answers HTTP 500 to a prompt's first request, generation 3
    answers garbage before the correction; else the best shown point moved toward 0.5."""
    seen: Counter = Counter()
    good = toward(0.5)

    def respond(body):
        gen, _, _ = shown(body)
        key = json.dumps(body["messages"])
        seen[key] += 1
        if gen == 2 and seen[key] == 1:
            return Reply(status=500)
        if gen == 3 and len(body["messages"]) == 2:
            return Reply("no idea")
        return good(body)

    return respond


def test_sigkill_resume_equals_uninterrupted_with_no_repeated_llm_call(make_config, tmp_path):  # noqa: F811
    from dfsmerge.search import load_search_config, run_search

    def strip(r):
        return {k: v for k, v in r.items() if k not in VOLATILE}

    cfg_dict = make_config("staged", "llm", popsize=4, max_evals=16,
                           objectives=[{"type": "synthetic", "name": "sphere"},
                                       {"type": "synthetic", "name": "path_length", "weight": 0.1}])
    with ChatServer(_faulty_responder()) as ref_server:
        cfg_dict["optimizer"] = {"name": "llm", "popsize": 4, **llm_options(ref_server, max_retries=1)}
        ref = tmp_path / "ref"
        run_search(load_search_config(cfg_dict), ref, progress=False)
    with ChatServer(_faulty_responder()) as server:
        cfg_dict["optimizer"] = {"name": "llm", "popsize": 4, **llm_options(server, max_retries=1)}
        cfg_path = tmp_path / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg_dict))
        killer = tmp_path / "killer.py"
        killer.write_text(KILLER)
        run = tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        rng = random.Random(17)  # random but reproducible kill points, each reachable within one process
        kills = [(w, rng.randint(1, hi)) for w, hi in [("llm_log", 2), ("append_eval", 4), ("llm_log", 3),
                                                        ("before_state", 3), ("after_state", 3), ("llm_log", 3)]]
        seen = []
        for i, (where, k) in enumerate(kills):
            args = [sys.executable, str(killer), where, str(k), "search", str(cfg_path), "--out", str(run), "--quiet"]
            p = subprocess.run(args + (["--resume"] if i else []), env=env, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == -9, f"kill point {where}@{k} was not reached (rc={p.returncode}): {p.stderr[-2000:]}"
            seen.append((len(read_evals(run)) if (run / "evals.jsonl").exists() else 0,
                         len(_log(run)) if (run / LOG_NAME).exists() else 0))
        p = subprocess.run([sys.executable, str(killer), "llm_log", "0", "search", str(cfg_path), "--out", str(run),
                            "--quiet", "--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        got_requests = Counter(json.dumps(b["messages"]) for b in server.requests)
    want_requests = Counter(json.dumps(b["messages"]) for b in ref_server.requests)
    assert got_requests == want_requests, "an LLM request was repeated or skipped"
    assert [strip(r) for r in _log(run)] == [strip(r) for r in _log(ref)]
    assert {r["error"] is not None for r in _log(ref, "call")} == {True, False}  # faults were exercised
    assert [strip(r) for r in read_evals(run)] == [strip(r) for r in read_evals(ref)]
    assert strip(json.loads((run / "best" / "best.json").read_text())) == strip(
        json.loads((ref / "best" / "best.json").read_text()))
    assert len(set(seen)) >= 4, f"kills happened at too few distinct points: {seen}"


# ---- local transformers backend ------------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("chat") / "m", seed=5, num_layers=2, hidden=16)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_local_backend_answers_as_vanilla_transformers_and_serves_over_http(chat_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()

    prefill = '{"mean": ['

    def vanilla(messages):  # reference: plain transformers greedy decoding with the chat template, prefilled
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return prefill + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def run(opt, run_dir):
        opt.bind_run_dir(run_dir)
        pops = []
        for _ in range(3):
            X = opt.ask()
            pops.append(X)
            opt.tell(X, _sphere(X))
        return pops

    rng_before = torch.get_rng_state()
    local = make_optimizer("llm", dim=6, bounds=(LO, HI), seed=1, popsize=4, backend="local", model=str(chat_model),
                           max_tokens=12, max_retries=0, constrain=False)
    local.options.preflight()
    (tmp_path / "local").mkdir()
    pops_local = run(local, tmp_path / "local")
    assert torch.equal(torch.get_rng_state(), rng_before), "the local backend moved torch's global RNG"
    calls = _log(tmp_path / "local", "call")
    assert len(calls) == 2
    for c in calls:
        assert c["response"] == vanilla(c["messages"])
    # the same model behind the HTTP server: the openai backend gets the same answers and populations
    with ChatServer(lambda body: Reply(vanilla(body["messages"]))) as server:
        (tmp_path / "http").mkdir()
        pops_http = run(_make(server, seed=1, popsize=4, max_retries=0), tmp_path / "http")
    assert [c["response"] for c in _log(tmp_path / "http", "call")] == [c["response"] for c in calls]
    for a, b in zip(pops_local, pops_http, strict=True):
        assert np.array_equal(a, b)


def _list_regex(dim: int, digits: int, int_digits: int) -> str:
    """Reference for the constrained answer: the regular expression of the list after the prefill."""
    num = rf"-?[0-9]{{1,{int_digits}}}" + (rf"(\.[0-9]{{1,{digits}}})?" if digits else "")
    return rf"(?:{num}, ){{{dim - 1}}}{num}\]"


@pytest.mark.parametrize(("dim", "digits", "int_digits"), [(1, 0, 1), (3, 2, 1), (4, 3, 2)])
def test_number_list_grammar_accepts_exactly_the_regex_prefixes(dim, digits, int_digits):
    import regex

    from dfsmerge.optim.llm import NumberListGrammar

    g = NumberListGrammar(dim, digits, int_digits)
    pattern = regex.compile(_list_regex(dim, digits, int_digits))
    rng = random.Random(dim * 100 + digits)
    alphabet = "0123456789.-, ]x"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(3000)]
    # near-valid strings: random numbers in the format, with a random suffix edit
    for _ in range(2000):
        nums = [("-" if rng.random() < 0.3 else "") + str(rng.randint(0, 10 ** (int_digits + 1)))
                + (f".{rng.randint(0, 10 ** (digits + 1))}" if rng.random() < 0.7 else "")
                for _ in range(rng.randint(1, dim + 1))]
        text = ", ".join(nums) + rng.choice(["]", "", ",", ", ", "]]"])
        texts.append(text[: rng.randint(0, len(text))] if rng.random() < 0.5 else text)
    for text in texts:
        state = g.run(text)
        assert (state is not None) == bool(pattern.fullmatch(text, partial=True)), text
        assert g.done(state) == bool(pattern.fullmatch(text)), text


@pytest.fixture(scope="module")
def digit_chat_model(chat_model, tmp_path_factory) -> Path:
    """chat_model with a character tokenizer that has ``]`` (in place of ``?``) and decodes without spaces."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dfsmerge.zoo.tiny import _VOCAB

    path = tmp_path_factory.mktemp("digits") / "m"
    shutil.copytree(chat_model, path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    tk = Tokenizer(models.WordLevel(vocab={("]" if t == "?" else t): i for i, t in enumerate(_VOCAB)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(path))
    return path


def test_local_backend_constrained_answer_is_greedy_under_the_grammar(digit_chat_model, tmp_path):
    import regex
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(digit_chat_model)
    model = AutoModelForCausalLM.from_pretrained(digit_chat_model, dtype=torch.float32).eval()
    prefill, dim, digits = '{"mean": [', 3, 2
    pattern = regex.compile(_list_regex(dim, digits, 1))  # bounds [-2, 3]: one integer digit

    def reference(messages):  # greedy over the full vocabulary, best token that keeps the answer a regex prefix
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(40):
            with torch.no_grad():
                logits = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1]
            answer = tok.decode(new)
            if pattern.fullmatch(answer):
                break
            nxt = next(t for t in torch.argsort(logits, descending=True, stable=True).tolist()
                       if t != tok.eos_token_id and pattern.fullmatch(answer + tok.decode([t]), partial=True))
            new.append(nxt)
        return prefill + tok.decode(new)

    opt = make_optimizer("llm", dim=dim, bounds=(LO, HI), seed=2, popsize=4, backend="local",
                         model=str(digit_chat_model), max_tokens=40, max_retries=0, digits=digits)
    opt.bind_run_dir(tmp_path)
    for _ in range(3):
        X = opt.ask()
        opt.tell(X, _sphere(X))
    calls = _log(tmp_path, "call")
    assert len(calls) == 2
    for c in calls:
        assert c["response"] == reference(c["messages"])
        assert parse_mean(c["response"], dim).shape == (dim,)
    assert [p["source"] for p in _log(tmp_path, "proposal")] == ["start", "llm", "llm"]
    with pytest.raises(ConfigError, match="prefill"):
        make_optimizer("llm", dim=dim, bounds=(LO, HI), backend="local", model=str(digit_chat_model), prefill="")


def test_local_backend_preflight_needs_a_chat_template(tmp_path):
    from dfsmerge.optim import validate_options
    from dfsmerge.zoo.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "plain", seed=0, num_layers=1, hidden=16)
    with pytest.raises(ConfigError, match="has no chat template"):
        validate_options("llm", backend="local", model=str(path)).preflight()
    with pytest.raises(ConfigError, match="does not load"):
        validate_options("llm", backend="local", model=str(tmp_path / "missing")).preflight()


def test_cli_missing_key_exits_2_without_run_dir(make_config, tmp_path, capsys, monkeypatch):  # noqa: F811
    from dfsmerge.cli import main

    monkeypatch.delenv("DFS_TEST_KEY", raising=False)
    d = make_config("ps", "llm")
    d["optimizer"] = {"name": "llm", "popsize": 4, "model": "m", "base_url": "http://127.0.0.1:9/v1",
                      "api_key_env": "DFS_TEST_KEY", "max_retries": 0}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["search", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "DFS_TEST_KEY" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
