"""The command line's shape: every subcommand dispatches the same way (its parser's ``handler``), and its ``--help``
ends with examples that are themselves valid invocations."""

from __future__ import annotations

import argparse
import shlex

import pytest

from dfsmerge.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``(words, parser)`` of every subcommand at any depth (``("zoo", "build")`` included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


COMMANDS = {" ".join(words): sub for words, sub in _commands(build_parser())}


def _examples(help_text: str) -> list[str]:
    """The lines of the help's closing ``examples:`` section (comments after ``#`` dropped)."""
    head, sep, tail = help_text.rpartition("\nexamples:\n")
    assert sep, "no examples section"
    return [line.split("#")[0].strip() for line in tail.splitlines() if line.strip()]


def test_every_subcommand_is_listed():
    assert {"merge", "search", "inspect", "export", "eval", "ablate", "moe", "extract-lora", "convert", "zoo",
            "zoo build"} == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_ends_with_examples_that_parse(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    examples = _examples(capsys.readouterr().out)
    assert 1 <= len(examples) <= 2, examples
    leaf = command.split() + ([] if COMMANDS[command]._subparsers is None else ["build"])
    for example in examples:
        words = shlex.split(example)
        assert words[:1 + len(leaf)] == ["dfsmerge", *leaf], f"{command}'s example runs another command: {example}"
        args = build_parser().parse_args(words[1:])  # a valid invocation (argparse exits on a bad one)
        assert args.handler is COMMANDS[" ".join(leaf)].get_default("handler")


def test_one_dispatch_style():
    """Every command that runs something is dispatched by its parser's ``handler`` default, and no other."""
    leaves = {c: p for c, p in COMMANDS.items() if p._subparsers is None}
    assert all(callable(p.get_default("handler")) for p in leaves.values())
    assert all(p.get_default("func") is None for p in COMMANDS.values())
    assert len({p.get_default("handler") for p in leaves.values()}) == len(leaves)


def test_shared_options_mean_one_thing():
    """A flag that several commands take from the shared parent parsers has one help text everywhere."""
    helps: dict[str, set[str]] = {}
    for command, p in COMMANDS.items():
        for action in p._actions:
            for flag in action.option_strings:
                if command != "search" or flag not in ("--seed", "--device"):  # search's override the config's
                    helps.setdefault(flag, set()).add(action.help)
    for flag in ("--quiet", "--force", "--allow-pickle", "--max-shard-size", "--max-memory", "--seed", "--device"):
        assert len(helps[flag]) == 1, (flag, helps[flag])
