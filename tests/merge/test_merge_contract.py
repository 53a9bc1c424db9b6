"""Registry-parametrised contract tests: every merge method through the same checks."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.errors import MergeError
from dfsmerge.merge import get_method, merge_tensor, registered_methods, tensor_seed

EXPECTED = {
    "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "sce", "multislerp", "karcher",
    "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}
METHODS = registered_methods()
RANDOM = [name for name in METHODS if get_method(name).random]


def test_registry_has_every_mergekit_method():
    assert set(METHODS) >= EXPECTED
    mergekit_methods = pytest.importorskip("mergekit.merge_methods", reason="mergekit 0.1.5 is the test oracle")
    assert {m.spec.name for m in mergekit_methods.registered_methods()} <= set(METHODS)
    assert set(RANDOM) == {"dare_ties", "dare_linear", "della", "della_linear"}


def test_unknown_method_lists_registered_names():
    with pytest.raises(MergeError, match="merge_method='tie'.*ties") as err:
        get_method("tie")
    for name in EXPECTED:
        assert name in str(err.value)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(8, 6), (7,), (2, 3, 4)])
def test_shape_dtype_finite(method, shape, valid_call):
    call = valid_call(method, shape)
    out = merge_tensor(method, call.tensors, **call.kwargs(), seed=1, name="w")
    assert out.shape == torch.Size(shape)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((torch.bfloat16,), torch.bfloat16),
        ((torch.float16,), torch.float16),
        ((torch.bfloat16, torch.float32), torch.float32),
        ((torch.float64,), torch.float64),
    ],
)
def test_dtype_promotion(method, dtypes, expected, valid_call):
    call = valid_call(method)
    tensors = [t.to(dtypes[i % len(dtypes)]) for i, t in enumerate(call.tensors)]
    out = merge_tensor(method, tensors, **call.kwargs(), seed=1, name="w")
    assert out.dtype == (tensors[0].dtype if len(tensors) == 1 else expected)
    reference = merge_tensor(method, [t.double() for t in tensors], **call.kwargs(), seed=1, name="w")
    err = (out.double() - reference).abs().max().item()
    assert err < 0.05, f"{method}: max abs diff to the float64 result {err}"


@pytest.mark.parametrize("method", METHODS)
def test_seeded_reproducible(method, valid_call):
    call = valid_call(method)
    a = merge_tensor(method, call.tensors, **call.kwargs(), seed=123, name="layers.0.w")
    b = merge_tensor(method, call.tensors, **call.kwargs(), seed=123, name="layers.0.w")
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", RANDOM)
def test_random_depends_on_seed_and_name(method, valid_call):
    call = valid_call(method, (32, 32))
    a = merge_tensor(method, call.tensors, **call.kwargs(), seed=1, name="w")
    assert not torch.equal(a, merge_tensor(method, call.tensors, **call.kwargs(), seed=2, name="w"))
    assert not torch.equal(a, merge_tensor(method, call.tensors, **call.kwargs(), seed=1, name="v"))


def test_tensor_seed_is_stable():
    # The same value in every process (not Python's salted hash), different for different names.
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert len({tensor_seed(s, n) for s in range(3) for n in ("a", "b", "c")}) == 9
    assert 0 <= tensor_seed(2**40, "model.layers.0.mlp.up_proj.weight") < 2**63


@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_not_modified(method, valid_call):
    call = valid_call(method)
    before = [t.clone() for t in call.tensors]
    merge_tensor(method, call.tensors, **call.kwargs(), seed=0, name="w")
    assert all(torch.equal(a, b) for a, b in zip(before, call.tensors, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter(method, valid_call):
    call = valid_call(method)
    with pytest.raises(MergeError, match="unknown parameter 'densty'"):
        merge_tensor(method, call.tensors, **{**call.kwargs(), "global_params": {"densty": 0.5}}, name="w")
    params = [dict(p) for p in call.params]
    params[-1]["wieght"] = 1.0
    with pytest.raises(MergeError, match="unknown parameter 'wieght' for model #"):
        merge_tensor(method, call.tensors, **{**call.kwargs(), "params": params}, name="w")


@pytest.mark.parametrize("method", [m for m in METHODS if any(p.required for p in get_method(m).params)])
def test_missing_required_parameter(method, valid_call):
    call = valid_call(method)
    spec = next(p for p in get_method(method).params if p.required)
    params = [{k: v for k, v in p.items() if k != spec.name} for p in call.params]
    global_params = {k: v for k, v in call.global_params.items() if k != spec.name}
    with pytest.raises(MergeError, match=f"missing required parameter '{spec.name}'.*'layers.3.w'"):
        merge_tensor(
            method,
            call.tensors,
            base_index=call.base_index,
            params=params,
            global_params=global_params,
            name="layers.3.w",
        )


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).base == "required"])
def test_missing_base(method, valid_call):
    call = valid_call(method)
    with pytest.raises(MergeError, match="requires a base model.*base_model"):
        merge_tensor(method, call.tensors, **{**call.kwargs(), "base_index": None}, name="w")


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).base != "none"])
def test_base_index_out_of_range(method, valid_call):
    call = valid_call(method)
    with pytest.raises(MergeError, match="base_index=9"):
        merge_tensor(method, call.tensors, **{**call.kwargs(), "base_index": 9}, name="w")


@pytest.mark.parametrize("method", METHODS)
def test_wrong_number_of_inputs(method, valid_call):
    m = get_method(method)
    call = valid_call(method)
    if m.max_inputs is not None or m.max_non_base is not None:
        extra = [*call.tensors, call.tensors[-1].clone()]
        params = [*call.params, dict(call.params[-1])]
        with pytest.raises(MergeError, match="needs (exactly|at most)"):
            merge_tensor(method, extra, **{**call.kwargs(), "params": params}, name="w")
    need = max(m.min_inputs, m.min_non_base + (call.base_index is not None))  # fewest valid inputs
    if need > 1:
        fewer, params = call.tensors[: need - 1], call.params[: need - 1]
        with pytest.raises(MergeError, match="needs (exactly|at least)"):
            merge_tensor(method, fewer, **{**call.kwargs(), "params": params}, name="w")


@pytest.mark.parametrize("method", METHODS)
def test_param_count_and_shape_mismatch(method, valid_call):
    call = valid_call(method)
    with pytest.raises(MergeError, match="per-model parameter sets"):
        merge_tensor(method, call.tensors, **{**call.kwargs(), "params": [*call.params, {}]}, name="w")
    if len(call.tensors) > 1:
        tensors = [*call.tensors[:-1], torch.zeros(9, 6)]
        with pytest.raises(MergeError, match=r"shapes differ for tensor 'embed'.*\(9, 6\)"):
            merge_tensor(method, tensors, **call.kwargs(), name="embed")


@pytest.mark.parametrize("method", METHODS)
def test_non_float_buffers(method, valid_call):
    call = valid_call(method)
    ints = [torch.arange(6) for _ in call.tensors]
    out = merge_tensor(method, ints, **call.kwargs(), name="position_ids")
    assert torch.equal(out, ints[0]) and out.dtype == torch.int64
    if len(ints) > 1:
        ints[-1] = ints[-1] + 1
        with pytest.raises(MergeError, match="non-floating tensor 'position_ids'"):
            merge_tensor(method, ints, **call.kwargs(), name="position_ids")


def test_bad_parameter_values(valid_call):
    call = valid_call("ties")
    with pytest.raises(MergeError, match="normalize='maybe'.*true or false"):
        merge_tensor("ties", call.tensors, **{**call.kwargs(), "global_params": {"normalize": "maybe"}})
    params = [dict(p) for p in call.params]
    params[1]["density"] = "dense"
    with pytest.raises(MergeError, match="density='dense' for model #1.*number"):
        merge_tensor("ties", call.tensors, **{**call.kwargs(), "params": params})
    with pytest.raises(MergeError, match="'lambda' is a global parameter"):
        params = [dict(p) for p in call.params]
        params[1]["lambda"] = 2.0
        merge_tensor("ties", call.tensors, **{**call.kwargs(), "params": params})


def test_global_value_of_per_model_parameter_broadcasts(valid_call):
    call = valid_call("ties")
    explicit = [p if i == 0 else {**p, "density": 0.3} for i, p in enumerate(call.params)]
    stripped = [{k: v for k, v in p.items() if k != "density"} for p in call.params]
    a = merge_tensor("ties", call.tensors, base_index=0, params=explicit, global_params={})
    b = merge_tensor("ties", call.tensors, base_index=0, params=stripped, global_params={"density": 0.3})
    assert torch.equal(a, b)


def test_della_epsilon_out_of_range_names_the_fix(valid_call):
    call = valid_call("della")
    with pytest.raises(MergeError, match=r"epsilon=0.6 with density=0.5.*epsilon < .*'w'"):
        merge_tensor("della", call.tensors, **{**call.kwargs(), "global_params": {"epsilon": 0.6}}, seed=0, name="w")
