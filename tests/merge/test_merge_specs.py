"""The declared parameters and input contracts equal mergekit 0.1.5's, method by method."""

from __future__ import annotations

import pytest

from dfsmerge.merge import GTA_VARIANTS, REQUIRED, get_method, registered_methods

mk = pytest.importorskip("mergekit.merge_methods", reason="mergekit 0.1.5 is the test oracle")
from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope  # noqa: E402

BASE = {BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional", BasePolicy.IGNORED: "none"}


@pytest.mark.parametrize("name", registered_methods())
def test_parameters_match_mergekit(name):
    ours = get_method(name)
    spec = mk.get(name).spec
    theirs = {
        p.name: (
            REQUIRED if p.default is MISSING else p.default,
            p.scope != ParameterScope.SHARED,
            p.scope == ParameterScope.NON_BASE,
        )
        for p in spec.parameters
    }
    assert {p.name: (p.default, p.per_model, p.non_base) for p in ours.params} == theirs


@pytest.mark.parametrize("name", registered_methods())
def test_contract_matches_mergekit(name):
    ours = get_method(name)
    contract = mk.get(name).spec.contract
    assert ours.base == BASE[contract.base]
    assert (ours.min_inputs, ours.max_inputs) == (contract.min_inputs, contract.max_inputs)
    assert (ours.min_non_base, ours.max_non_base) == (contract.min_non_base or 0, contract.max_non_base)


@pytest.mark.parametrize("name", sorted(GTA_VARIANTS))
def test_gta_variants_match_mergekit(name):
    ours, theirs = GTA_VARIANTS[name], mk.get(name)
    assert (ours.default_normalize, ours.default_rescale) == (theirs.default_normalize, theirs.default_rescale)
    assert (ours.sparsification and ours.sparsification.value) == (
        theirs.sparsification_method and theirs.sparsification_method.value
    )
    assert (ours.consensus and ours.consensus.value) == (theirs.consensus_method and theirs.consensus_method.value)
    assert get_method(name).random == (
        ours.sparsification is not None and ours.sparsification.value in ("random", "della_magprune")
    )
