"""Helpers shared by the cluster tests (not a test module)."""

from __future__ import annotations

import argparse
import contextlib
import io


def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cluster_commands_wired() -> bool:
    """Whether pipelines/cli.py registers `cluster`, `submit` and `jobs` itself."""
    from pipelines import cli

    return {"cluster", "submit", "jobs"} <= set(subparsers(cli.build_parser()).choices)


def full_parser() -> argparse.ArgumentParser:
    """The ``segfactory`` parser with the cluster commands (added here if cli.py lacks them)."""
    from cluster.cli import add_cluster_commands
    from pipelines import cli

    parser = cli.build_parser()
    if "cluster" not in subparsers(parser).choices:
        add_cluster_commands(subparsers(parser))
    return parser


def segfactory(*argv: str) -> tuple[int, str, str]:
    """``segfactory ARGV`` in this process: (exit code, stdout, stderr).

    Until pipelines/cli.py registers the cluster commands, they are added to its parser for the
    duration of the call (test_cli_registers_cluster_commands says whether they are).
    """
    from cluster.cli import add_cluster_commands
    from pipelines import cli

    original = cli.build_parser
    if not cluster_commands_wired():
        def build_parser() -> argparse.ArgumentParser:
            parser = original()
            add_cluster_commands(subparsers(parser))
            return parser
        cli.build_parser = build_parser
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    finally:
        cli.build_parser = original
    return code, out.getvalue(), err.getvalue()
