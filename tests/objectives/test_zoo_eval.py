"""On the toy zoo's own tasks (BOS-prepending tokenizer, EOS as the only stop): HFLM == adapter == native."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_zoo_task_hflm_adapter_native_agree(tmp_path_factory):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfsmerge.objectives import EvalConfig, ObjectiveConfig, TaskSuite
    from dfsmerge.objectives.lm_adapter import DfsLM
    from dfsmerge.objectives.tasks import simple_evaluate
    from dfsmerge.zoo.build import build_zoo

    zoo = build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", progress=False)
    path = zoo.model_path("math")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    task = "zoo_generic_e"
    ref = simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu"), [task],
                          task_paths=[zoo.task_dir], limit=48, bootstrap_iters=0)
    got = simple_evaluate(DfsLM(model, tok, batch_size=16), [task], task_paths=[zoo.task_dir], limit=48,
                          bootstrap_iters=0)
    assert [s["resps"] for s in got["samples"][task]] == [s["resps"] for s in ref["samples"][task]]
    em = ref["results"][task]["exact_match,none"]
    assert got["results"][task]["exact_match,none"] == em
    cfg = EvalConfig(objectives=(ObjectiveConfig(name=task, limit=48, native=True),),
                     task_paths=(str(zoo.task_dir),), batch_size=16, builtin_tasks=False)
    assert TaskSuite(cfg, tok).evaluate(model, tok) == {task: {"exact_match,none": em}}
