"""Function length and cyclomatic complexity of a package: the functions over the limits.

    .venv/bin/python benchmarks/code_shape.py [training] [--max-lines 60] [--max-complexity 15]

Length is a function's line span (``def`` to its last line, nested functions included);
complexity is ruff's C901 (McCabe) measure, read from ``ruff check --select C901`` with the
limit given (ruff already knows the ignores in pyproject, so this asks with ``--isolated``).
Prints every function over either limit and the totals, so a before/after is two runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def long_functions(package: Path, limit: int) -> list[tuple[str, int]]:
    """(``file:function``, lines) of every function longer than ``limit`` lines."""
    out = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((f"{path.relative_to(ROOT)}:{node.name}", n))
    return sorted(out, key=lambda x: -x[1])


def complex_functions(package: Path, limit: int) -> list[tuple[str, int]]:
    """(``file:function``, complexity) of every function over ``limit`` (ruff C901)."""
    ruff = Path(sys.executable).with_name("ruff")
    cmd = [str(ruff), "check", "--isolated", "--select", "C901", "--output-format", "json",
           "--config", f"lint.mccabe.max-complexity = {limit}", str(package)]
    found = json.loads(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout or "[]")
    out = []
    for f in found:
        m = re.match(r"`(.+)` is too complex \((\d+) > \d+\)", f["message"])
        if m:
            out.append((f"{Path(f['filename']).relative_to(ROOT)}:{m.group(1)}", int(m.group(2))))
    return sorted(out, key=lambda x: -x[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", nargs="?", default="training")
    p.add_argument("--max-lines", type=int, default=60)
    p.add_argument("--max-complexity", type=int, default=15)
    a = p.parse_args()
    pkg = ROOT / a.package
    longs, cplx = long_functions(pkg, a.max_lines), complex_functions(pkg, a.max_complexity)
    print(f"functions over {a.max_lines} lines in {a.package}/: {len(longs)}")
    for name, n in longs:
        print(f"  {n:4d}  {name}")
    print(f"functions over complexity {a.max_complexity} in {a.package}/: {len(cplx)}")
    for name, n in cplx:
        print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
