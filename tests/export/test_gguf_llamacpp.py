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
        rows = bench.compare(name, kind, plan, tmp_path, tokens=16, quant="f32", threads=1, python=python,
                             kv=("f16", "f32"))
        assert len(rows) == 2 * len(bench.PROMPTS)
        for r in rows:
            assert r["tokenizer_same"], f"{name} {kind} kv {r['kv']} {r['prompt']!r}: llama.cpp tokenizes differently"
            assert r["same"], (f"{name} {kind} kv {r['kv']} {r['prompt']!r}: greedy tokens differ from step "
                               f"{r['first_diff']} (top-2 margins there: HF {r['hf_margin']:.3g}, llama.cpp "
                               f"{r['cpp_margin']:.3g}; max rel logit diff over the prompt {r['rel_logits']:.3g})")
            # measured (docs/llama-cpp.md): SmolLM2 1.6e-6 with llama.cpp's KV cache in f32 (f32 arithmetic on both
            # sides), 7e-4 with its default f16 cache; Gemma 3 1.3e-3 at most either way (llama.cpp's CPU GELU is an
            # f16 lookup table, which alone moves transformers' logits by as much)
            bound = 1e-5 if (name, r["kv"]) == ("smollm2-135m", "f32") else 3e-3
            assert r["rel_logits"] < bound, (f"{name} {kind} kv {r['kv']} {r['prompt']!r}: logits differ by "
                                             f"{r['rel_logits']:.3g} relative (bound {bound:g})")
