"""llama.cpp itself (``llama-cpp-python``, built from its PyPI sdist) loads the GGUF exports of SmolLM2-135M (identity
and a plan repeating layers with scales) and Gemma 3 270M (identity and a repeated 6-layer block) and continues three
prompts greedily for 16 tokens exactly as the folded export does in transformers (f32). Opt-in (compiling llama.cpp
takes ~15 min); skipped with its reason when the library is absent::

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-binary :all: llama-cpp-python==0.3.36
    pytest -m llamacpp tests/export/test_gguf_llamacpp.py

The comparison is benchmarks/gguf_llamacpp.py's (it also prints the numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (opt-in: build it from its PyPI sdist, "
                                        "see this module's docstring)")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow, pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gguf_llamacpp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gguf_llamacpp_bench", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_llamacpp_greedy_equals_folded_export(name, tmp_path):
    from dfsmerge.io.realmodels import real_model_dir

    bench = _bench()
    src = real_model_dir(name)
    for kind, plan in bench.plans(name, src).items():
        rows = bench.compare(name, kind, plan, tmp_path, tokens=16, quant="f32", threads=1)
        for r in rows:
            assert r["tokenizer_same"], f"{name} {kind} {r['prompt']!r}: llama.cpp tokenizes differently"
            assert r["same"], (f"{name} {kind} {r['prompt']!r}: greedy tokens differ from position {r['first_diff']} "
                               f"(max rel logit diff over the prompt {r['rel_logits']:.3g})")
