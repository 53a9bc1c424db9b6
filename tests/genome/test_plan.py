"""PathPlan: YAML round trip in the plan-file format, validation errors, layer-path graph."""

from __future__ import annotations

import pickle

import pytest
import yaml

from dfsmerge.errors import ConfigError
from dfsmerge.genome.plan import LayerRef, PathPlan, Step

PLAN_YAML = """\
models: {A: path/or/hub-id, B: path/or/hub-id}
base: A            # supplies tokenizer, embeddings, final norm, head
path:
  - {model: A, layer: 0, scale: 1.0}
  - {model: B, layer: 5, scale: 0.85}
"""


def test_issue_plan_format_parses_and_round_trips():
    plan = PathPlan.from_yaml(PLAN_YAML)
    assert plan.steps == (Step(LayerRef("A", 0), 1.0), Step(LayerRef("B", 5), 0.85))
    assert dict(plan.models) == {"A": "path/or/hub-id", "B": "path/or/hub-id"}
    assert plan.base == "A" and plan.embed is None
    assert PathPlan.from_yaml(plan.to_yaml()) == plan
    assert yaml.safe_load(plan.to_yaml()) == yaml.safe_load(PLAN_YAML)  # same keys, same values, no extras


def test_embed_key_written_only_when_not_base(tmp_path):
    plan = PathPlan((Step(LayerRef("A", 0)),), models={"A": "a", "B": "b"}, base="A", embed="B")
    assert plan.to_dict()["embed"] == "B"
    plan.save(tmp_path / "plan.yaml")
    assert PathPlan.load(tmp_path / "plan.yaml") == plan
    assert "embed" not in PathPlan.identity("A", 2).to_dict()


def test_plan_is_frozen_hashable_and_picklable():
    plan = PathPlan.from_yaml(PLAN_YAML)
    with pytest.raises(AttributeError):
        plan.base = "B"  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.models["C"] = "c"  # type: ignore[index]
    assert hash(plan) == hash(PathPlan.from_yaml(PLAN_YAML))
    assert pickle.loads(pickle.dumps(plan)) == plan


@pytest.mark.parametrize("text, needle", [
    ("models: {A: a}\npath:\n  - {model: C, layer: 0}\n", "path[0].model='C'"),
    ("models: {A: a}\npath:\n  - {model: A, layer: -1}\n", "path[0].layer=-1"),
    ("models: {A: a}\npath:\n  - {model: A, layer: 0, scale: 0}\n", "path[0].scale=0"),
    ("models: {A: a}\npath:\n  - {model: A, layer: x}\n", "path[0].layer='x'"),
    ("models: {A: a}\npath:\n  - {model: A, layer: 0, scal: 1}\n", "unknown keys ['scal']"),
    ("models: {A: a}\nbase: Z\npath:\n  - {model: A, layer: 0}\n", "base='Z'"),
    ("models: {A: a}\npath: []\n", "path is empty"),
    ("path: []\n", "plan.models"),
    ("models: {A: a}\npath: [\n", "not valid YAML"),
])
def test_validation_errors_name_field_and_value(text, needle):
    with pytest.raises(ConfigError) as err:
        PathPlan.from_yaml(text)
    assert needle in str(err.value)


def test_layer_range_checked_against_pool_sizes():
    plan = PathPlan.from_yaml(PLAN_YAML)
    with pytest.raises(ConfigError, match=r"path\[1\].layer=5 is out of range for model 'B' with 4 layers"):
        plan.validate({"A": 4, "B": 4})
    plan.validate({"A": 4, "B": 6})


def test_graph_counts_transitions_and_uses():
    a0, a1, b0 = LayerRef("A", 0), LayerRef("A", 1), LayerRef("B", 0)
    plan = PathPlan((Step(a0), Step(a1, 0.5), Step(b0, 2.0), Step(a1, 1.5), Step(b0, 1.0)),
                    models={"A": "a", "B": "b"}, base="A")
    g = plan.graph(pool_layers=[a0, a1, b0, LayerRef("B", 1)])
    assert g.nodes[a1]["uses"] == 2 and g.nodes[LayerRef("B", 1)]["uses"] == 0
    assert g.edges[a1, b0]["count"] == 2 and g.edges[a1, b0]["scales"] == [2.0, 1.0]
    assert g.edges[a1, b0]["scale"] == 1.5
    assert g.edges[b0, a1]["count"] == 1 and g.edges[b0, a1]["scale"] == 1.5
    assert g.has_edge("embed", a0) and g.has_edge(b0, "head")
    # every step is one edge traversal: the counts sum to the path length + 1 (into the head)
    assert sum(d["count"] for _, _, d in g.edges(data=True)) == len(plan) + 1
