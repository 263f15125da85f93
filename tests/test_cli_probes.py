"""The command-line defects of issue 25's probe campaign, one regression test each: an output that
is an input, options accepted silently (--aa, abbreviations), tracebacks and vague messages for
bad files and schedules, and records or defaults that said something else than what was used."""
import argparse
import json
import os

import pytest
import torch

from incubation import cli
from incubation.bench import study


def _parsers(parser):
    """`parser` and every sub-parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


# ----------------------------------------------------------------------------------------------
# argparse's prefix matching: --drop became --drop-path without a word
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, prefix", [(["meta", "--drop", "0.1"], "--drop"),
                                          (["expand", "ckpt", "-o", "big", "--dept", "3"], "--dept"),
                                          (["grow", "--sched", "even"], "--sched")])
def test_a_prefix_of_an_option_is_no_option(argv, prefix, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_no_parser_matches_prefixes():
    parsers = _parsers(cli.build_parser()) + _parsers(study.build_parser())
    assert len(parsers) > 10
    for parser in parsers:
        assert parser.allow_abbrev is False, parser.prog
