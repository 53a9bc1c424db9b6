"""Names and references shared by the objectives tests (a uniquely named module: ``conftest`` is ambiguous when
the whole suite runs)."""

from __future__ import annotations

import torch

MC_TASK, GEN_TASK, PPL_TASK = "dfst_mc", "dfst_gen", "dfst_ppl"
GEN_UNTIL = [".", "?"]
GEN_MAX_TOKS = 5


def reference_greedy(model, tok, prompt: str, *, max_new: int, until: list[str]) -> str:
    """Unbatched greedy decoding by full forwards (no cache, no padding): an independent reference."""
    ids = tok.encode(prompt)
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
