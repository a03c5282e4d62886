"""Helpers shared by the cluster tests (not a test module)."""

from __future__ import annotations

import argparse
import contextlib
import io


def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cluster_commands_wired() -> bool:
    """Whether segfactory/cli.py registers `cluster`, `submit` and `jobs` itself."""
    from segfactory import cli

    return {"cluster", "submit", "jobs"} <= set(subparsers(cli.build_parser()).choices)


def full_parser() -> argparse.ArgumentParser:
    """The ``segfactory`` parser."""
    from segfactory import cli

    return cli.build_parser()


def segfactory(*argv: str) -> tuple[int, str, str]:
    """``segfactory ARGV`` in this process: (exit code, stdout, stderr)."""
    from segfactory import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()
