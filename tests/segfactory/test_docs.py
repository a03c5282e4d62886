"""The docs agree with the code: every `segfactory ...` line in a command block of README.md and
docs/*.md parses with the real argparse parser (subcommands, flags, choices), shipped config
names resolve, and docs/graphs.md names every registered graph. The blocks that run on the toy
preset are run end to end by the demo test and test_operator; this one is quick."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from segfactory.cli import UsageError, build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
# placeholders a reader replaces: shown as they are in the docs, given a value for the parser
PLACEHOLDERS = {"generate ...": "generate --config seggen-toy", "[--format json]": "--format json", "[--wait]": "--wait", "[--address URL]": "",
                "[--follow]": "--follow", "[key=value ...]": "", "key=value ...": "", "...": "",
                "cluster up | down | status": "cluster status", "up|down|status": "status"}


def command_lines(text: str) -> list[str]:
    """`segfactory` command lines of the fenced and indented code blocks (continuations joined)."""
    blocks = FENCE.findall(text)
    blocks += ["\n".join(m) for m in re.findall(r"(?:^(?:    .*\n))+", text, re.M) if m]
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            line = re.sub(r"^(\S*/)?(\.venv/bin/)?segfactory\b", "segfactory", line)
            if line.startswith("segfactory ") and "<" not in line and "COMMAND" not in line:
                lines.append(line)
    return lines


def _all_lines() -> list[tuple[str, str]]:
    return [(doc.name, line) for doc in DOCS for line in command_lines(doc.read_text())]


def test_the_docs_have_command_lines():
    names = {doc for doc, _ in _all_lines()}
    assert len(_all_lines()) >= 20 and {"README.md", "generate.md", "train.md"} <= names


NUMBERS = {"N": "1", "PX": "64", "S": "0"}  # synopsis placeholders of integer flags


def concrete(line: str) -> list[str]:
    """A synopsis (``[--flag N]``, ``up | down``) as one command line: optional parts kept,
    the first alternative taken, integer placeholders given a value."""
    for shown, value in PLACEHOLDERS.items():
        line = line.replace(shown, value)
    line = line.split(" | ")[0].replace("[", "").replace("]", "")
    return [NUMBERS.get(tok, tok) for tok in shlex.split(line)[1:]]


@pytest.mark.parametrize(("doc", "line"), _all_lines(), ids=lambda v: v[:70] if isinstance(v, str) else v)
def test_every_documented_command_line_parses(doc, line):
    argv = concrete(line)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        pytest.fail(f"{doc}: `{line}`: {exc}")
    config = getattr(args, "config", None)
    if config and re.fullmatch(r"[a-z0-9-]+", config):
        from segfactory.configs import resolve_config

        resolve_config(config)  # a shipped name the docs use must exist


def test_graphs_doc_names_every_registered_graph():
    from pipelines.graphs import graph_names

    text = (ROOT / "docs" / "graphs.md").read_text()
    missing = [name for name in graph_names() if f"`{name}`" not in text]
    assert missing == [], f"docs/graphs.md does not name {missing}"
    readme = (ROOT / "README.md").read_text()
    assert [n for n in graph_names() if f"| `{n}` |" not in readme] == []  # the README's graph table
