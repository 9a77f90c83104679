"""`edge --help` and every command's help: complete, and what a new user needs (issue 21)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import edge.errors
from edge.cli import BENCHES, EXIT_CODES, build_parser, main

#: the commands this module's rules cover fully: help on every option
OWN = {"run", "demo", "compile", "bench", "status", "pin", "label-key", "label", "keys", "fleet-server"}


def _walk(ap: argparse.ArgumentParser, path=()):
    yield path, ap
    for act in ap._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sp in act.choices.items():
                yield from _walk(sp, path + (name,))


def test_no_command_is_a_friendly_line_and_exit_1(capsys):
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "no command given" in err and "edge --help" in err and "required" not in err


def test_no_command_as_a_process_exits_1_not_the_config_code():
    p = subprocess.run([sys.executable, "-m", "edge.cli"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no command given" in p.stderr


def test_every_command_has_a_description():
    missing = [" ".join(p) for p, sp in _walk(build_parser()) if p and not sp.description]
    assert not missing


def test_every_option_of_our_commands_has_help_and_shows_its_default():
    for path, sp in _walk(build_parser()):
        if not path or path[0] not in OWN:
            continue
        text = sp.format_help()
        for act in sp._actions:
            if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert act.help, f"edge {' '.join(path)} {act.option_strings or act.dest}: no help"
            if act.option_strings and act.default not in (None, False, ""):
                assert "default" in sp.formatter_class(prog="x")._get_help_string(act), (path, act.dest)
        assert "`" not in text, f"backtick markup in edge {' '.join(path)} --help"


def test_options_without_help_elsewhere_still_show_their_default():
    keys_create = dict(_walk(build_parser()))[("keys", "create")]
    assert "(default: ~/.config/edge-runtime/keys)" in keys_create.format_help()


def test_top_level_help_lists_every_exit_code():
    text = build_parser().format_help()
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  " in text
    assert "`" not in text


def test_every_error_kind_has_its_code_in_the_one_list():
    import edge.fleet.keys  # noqa: F401  (KeyFileError: code 9)

    def kinds(c):
        for s in c.__subclasses__():
            yield s
            yield from kinds(s)

    codes = {k.exit_code for k in kinds(edge.errors.EdgeError)} | {edge.errors.EdgeError.exit_code}
    assert codes <= set(EXIT_CODES)


def test_readme_exit_codes_are_the_list():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} | {EXIT_CODES[code]} |" in readme, f"exit code {code} not in the README's table as in EXIT_CODES"


def test_bench_lists_every_benchmark_with_a_line():
    b = dict(_walk(build_parser()))[("bench",)]
    text = b.format_help()
    for name in BENCHES:
        assert f"  {name} " in text


@pytest.mark.parametrize("what", ["serve", "adapt", "fleet"])
def test_bench_subcommand_help_has_no_backticks(what):
    p = subprocess.run([sys.executable, "-m", "edge.cli", "bench", what, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "`" not in p.stdout


def test_label_key_help_shows_where_it_writes():
    lk = dict(_walk(build_parser()))[("label-key",)]
    assert "/etc/edge-runtime/labellers" in lk.format_help()


def test_demo_seconds_help_tells_the_real_defaults():
    d = dict(_walk(build_parser()))[("demo",)]
    text = " ".join(d.format_help().split())
    assert "until Ctrl-C" in text and "90" in text and "60" in text
