"""``fused_merge`` dispatch: backend choice, parameter plumbing, clear errors, and life without triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dfsmerge.errors import MergeError
from dfsmerge.kernels import METHOD_NAMES, fused_merge, triton_supports
from dfsmerge.kernels.gta import gta_reference


def _inputs(shape=(33, 65), n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n - 1)]


def _call(method, tensors, **kw):
    if method == "slerp":
        return fused_merge(method, tensors[:2], base_index=0, global_params={"t": 0.4}, **kw)
    return fused_merge(method, tensors, base_index=0, params={"weight": 0.5, "density": 0.5, "epsilon": 0.1}, **kw)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_auto_on_cpu_uses_reference(method):
    tensors = _inputs()
    assert not triton_supports(tensors)
    auto = _call(method, tensors, seed=3)
    reference = _call(method, tensors, seed=3, backend="reference")
    assert torch.equal(auto, reference)


def test_params_as_per_input_mappings_equal_params_as_lists():
    tensors = _inputs(n=4)  # base at index 1: its weight (9.0) and density are ignored
    as_lists = fused_merge("ties", tensors, base_index=1, params={"weight": [0.2, 9.0, 0.3, 0.4],
                                                                  "density": [0.5, 0.6, 0.7]})
    as_dicts = fused_merge("ties", tensors, base_index=1,
                           params=[{"weight": 0.2, "density": 0.5}, {"weight": 9.0},
                                   {"weight": 0.3, "density": 0.6}, {"weight": 0.4, "density": 0.7}])
    direct = gta_reference("ties", tensors[1], [tensors[0], tensors[2], tensors[3]], weights=[0.2, 0.3, 0.4],
                           densities=[0.5, 0.6, 0.7], gammas=[0.01] * 3, epsilons=[0.15] * 3, normalize=True,
                           rescale=False, lam=1.0)
    assert torch.equal(as_dicts, direct)
    assert torch.equal(as_lists, direct)


def test_out_is_written_in_place_on_reference_path():
    tensors = _inputs(dtype=torch.bfloat16)
    out = torch.empty_like(tensors[0])
    result = _call("task_arithmetic", tensors, out=out)
    assert result is out
    assert torch.equal(out, _call("task_arithmetic", tensors))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method_name": "nuslerp"}, "no fused kernel"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"params": {"density": 0.5}}, "missing required parameter 'weight'"),
        ({"params": {"weight": 1.0, "dens": 0.5}}, "unknown parameter"),
        ({"base_index": 7}, "base_index=7"),
        ({"params": {"weight": [1.0, 2.0, 3.0, 4.0, 5.0]}}, "has 5 values"),
        ({"params": {"weight": 1.0, "density": 0.5, "epsilon": 0.6}, "method_name": "della"}, "epsilon"),
        ({"params": {"weight": [1.0, -1.0, 0.0]}, "method_name": "linear"}, "sum to 0"),
    ],
)
def test_clear_errors(kwargs, needle):
    call = {"method_name": "ties", "base_index": 0, "params": {"weight": 1.0}, "backend": "reference", **kwargs}
    method = call.pop("method_name")
    with pytest.raises(MergeError, match=needle):
        fused_merge(method, _inputs(), **call)


def test_shape_mismatch_is_a_merge_error():
    tensors = _inputs()
    with pytest.raises(MergeError, match="shape"):
        fused_merge("ties", [tensors[0], tensors[1][:5]], base_index=0, params={"weight": 1.0})


class TestForcedTriton:
    @pytest.fixture(autouse=True)
    def _need_triton(self):
        pytest.importorskip("triton")

    def test_float64_names_dtype_and_fix(self):
        tensors = _inputs(dtype=torch.float64)
        with pytest.raises(MergeError, match=r"float64.*(cast|reference)"):
            _call("ties", tensors, backend="triton")

    def test_non_contiguous_names_layout(self):
        tensors = [t.t() for t in _inputs()]
        with pytest.raises(MergeError, match="contiguous"):
            _call("ties", tensors, backend="triton")

    def test_cpu_without_interpreter_names_device(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(MergeError, match=r"cpu.*CUDA"):
            _call("dare_ties", _inputs(), backend="triton")

    def test_out_dtype_checked(self):
        tensors = _inputs()
        with pytest.raises(MergeError, match="out has dtype torch.int32"):
            _call("linear", tensors, backend="triton", out=torch.empty((33, 65), dtype=torch.int32))


def test_package_works_without_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from dfsmerge.errors import MergeError
        from dfsmerge.kernels import fused_merge, triton_available
        assert not triton_available()
        x = [torch.randn(5, 3) for _ in range(3)]
        for m in ("ties", "dare_ties", "della", "linear", "slerp"):
            tensors = x[:2] if m == "slerp" else x
            fused_merge(m, tensors, base_index=0, params={"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                        global_params={"t": 0.5} if m == "slerp" else None)
        try:
            fused_merge("ties", x, base_index=0, params={"weight": 0.5}, backend="triton")
        except MergeError as e:
            assert "triton is not installed" in str(e), e
        else:
            raise SystemExit("forced triton without triton must raise")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
