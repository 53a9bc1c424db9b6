"""llama.cpp itself (``llama-cpp-python``, built from its PyPI sdist) loads the GGUF exports of SmolLM2-135M (identity
and a plan repeating layers with scales) and Gemma 3 270M (identity and a repeated 6-layer block) and continues three
prompts greedily for 16 tokens exactly as the folded export does in transformers (f32 weights), and tokenizes each
prompt as the Hugging Face tokenizer does.

Opt-in, and skipped with its reason when no llama.cpp interpreter is configured: CI has no llama.cpp (compiling it
takes 15-50 minutes), so there the independent check of the GGUF files is transformers' GGUF loader
(tests/export/test_gguf_real.py, test_gguf_export.py). llama.cpp runs in a subprocess of its own interpreter, so this
environment needs no llama-cpp-python; build it once (docs/llama-cpp.md) and run::

    python3 -m venv /work/llamavenv && /work/llamavenv/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" /work/llamavenv/bin/pip install \
        --no-binary llama-cpp-python llama-cpp-python==0.3.36
    DFSMERGE_LLAMACPP_PYTHON=/work/llamavenv/bin/python pytest -m llamacpp tests/export/test_gguf_llamacpp.py

The comparison is benchmarks/gguf_llamacpp.py's (which also prints the numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow, pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gguf_llamacpp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gguf_llamacpp_bench", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_llamacpp_greedy_equals_folded_export(name, tmp_path):
    bench = _bench()
    python = bench.llama_python()
    if python is None:
        pytest.skip(f"no llama.cpp interpreter: set {bench.LLAMA_PYTHON_ENV} to a Python with llama-cpp-python "
                    "built from its sdist (opt-in; CI has none; see this module's docstring)")
    from dfsmerge.io.realmodels import real_model_dir

    src = real_model_dir(name)
    for kind, plan in bench.plans(name, src).items():
        rows = bench.compare(name, kind, plan, tmp_path, tokens=16, quant="f32", threads=1, python=python)
        assert len(rows) == len(bench.PROMPTS)
        for r in rows:
            assert r["tokenizer_same"], f"{name} {kind} {r['prompt']!r}: llama.cpp tokenizes differently"
            assert r["same"], (f"{name} {kind} {r['prompt']!r}: greedy tokens differ from step {r['first_diff']} "
                               f"(top-2 margins there: HF {r['hf_margin']:.3g}, llama.cpp {r['cpp_margin']:.3g}; "
                               f"max rel logit diff over the prompt {r['rel_logits']:.3g})")
            assert r["rel_logits"] < 1e-3, f"{name} {kind} {r['prompt']!r}: logits differ by {r['rel_logits']:.3g}"
