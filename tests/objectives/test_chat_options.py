"""Objective prompt options and generation overrides: parsing as the ``lm_eval`` command line does, defaults as it
sets them, and one-line errors before any model is loaded (``dfsmerge eval``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dfsmerge.cli import main
from dfsmerge.objectives.config import GenKwargs, ObjectiveConfig


def test_gen_kwargs_parse_like_lm_eval_cli():
    g = GenKwargs.parse(['max_gen_toks=6,until=["\\n", "a,b"]', "do_sample=False"])
    assert g == GenKwargs(max_gen_toks=6, until=("\n", "a,b"), do_sample=False)
    assert GenKwargs.parse("until=.").until == (".",)
    assert GenKwargs.parse(None) is None
    assert g.as_task_kwargs() == {"max_gen_toks": 6, "until": ["\n", "a,b"], "do_sample": False}
    for bad in ("temperature=0.7", "do_sample=True", "max_gen_toks=0"):
        with pytest.raises(ValidationError):
            GenKwargs.parse(bad)


def test_fewshot_as_multiturn_defaults_like_lm_eval():
    assert ObjectiveConfig(name="t", apply_chat_template=True).chat_args["fewshot_as_multiturn"] is True
    assert ObjectiveConfig(name="t").chat_args == dict(apply_chat_template=False, system_instruction=None,
                                                       fewshot_as_multiturn=False)
    off = ObjectiveConfig(name="t", apply_chat_template=True, fewshot_as_multiturn=False)
    assert off.chat_args["fewshot_as_multiturn"] is False
    with pytest.raises(ValidationError, match="fewshot_as_multiturn=true but apply_chat_template=false"):
        ObjectiveConfig(name="t", fewshot_as_multiturn=True)


@pytest.mark.parametrize("flags, needle", [
    (["--gen_kwargs", "temperature=0.7"], "temperature"),
    (["--gen_kwargs", "do_sample=True"], "do_sample"),
    (["--fewshot_as_multiturn"], "apply_chat_template"),
])
def test_eval_flags_fail_before_loading(flags, needle, capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")  # never loaded: the flags are checked first
    assert main(["eval", missing, "--tasks", "t", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "no-such-model" not in err, err
