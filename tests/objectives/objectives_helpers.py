"""Names and references shared by the objectives tests (a uniquely named module: ``conftest`` is ambiguous when
the whole suite runs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MC_TASK, GEN_TASK, PPL_TASK = "dfst_mc", "dfst_gen", "dfst_ppl"
GEN_UNTIL = [".", "?"]
GEN_MAX_TOKS = 5


def reference_greedy(model, tok, prompt: str | list[int], *, max_new: int, until: list[str]) -> str:
    """Unbatched greedy decoding by full forwards (no cache, no padding): an independent reference (``prompt``: text,
    or its token ids)."""
    ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    text = tok.decode(out, skip_special_tokens=True)
    for s in until + [tok.eos_token]:
        text = text.split(s)[0]
    return text


def run_lm_eval(lm, tasks, task_dir, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None, bootstrap_iters=0, log_samples=True, verbosity="ERROR",
                                   **kw)


def strip_stderr(res: dict) -> dict:
    return {k: v for k, v in res.items() if "stderr" not in k}


def write_task(task_dir: Path, name: str, body: str, rows: dict[str, list[dict]]) -> None:
    """An lm-eval task YAML ``name`` over JSONL files of ``rows`` (split -> documents) in ``task_dir``."""
    files = {}
    for split, docs in rows.items():
        path = task_dir / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[split] = str(path)
    data_files = "".join(f"    {split}: {p}\n" for split, p in files.items())
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{data_files}{body}")
