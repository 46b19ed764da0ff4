"""`lossd --version`, and `--help` that lists every subcommand and shows every option's default."""

import argparse
import re
import subprocess
import sys

import pytest

import lossd
from lossd import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lossd.cli", *args], capture_output=True, text=True, timeout=60)


def _subparsers():
    parsers = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):  # noqa: ARG001
        action = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
        parsers.update(action.choices)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return parsers


def test_version():
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lossd {lossd.__version__}"


def test_help_lists_every_subcommand():
    res = _run("--help")
    assert res.returncode == 0
    names = set(_subparsers())
    assert {"serve", "losses", "demo", "quality"} <= names
    for name in names:
        assert re.search(rf"^\s+{name}\s+\S", res.stdout, flags=re.M), (name, res.stdout)


def test_every_default_is_in_the_help():
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            assert f"(default: {action.default})" in text, (name, action.dest, text)
