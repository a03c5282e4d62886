"""`cluster/` and `segfactory --help` load without torch (and without Ray for --help), in a fresh
interpreter so nothing imported by other tests hides a heavy import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).parent

CHECK = """
import sys
sys.path.insert(0, {helpers!r})
{body}
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "ray") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def _heavy_after(body: str) -> tuple[list[str], str]:
    code = CHECK.format(helpers=str(HELPERS), body=body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m], proc.stdout


@pytest.mark.subprocess
def test_cluster_package_imports_without_torch_or_ray():
    heavy, _ = _heavy_after("import cluster, cluster.cli, cluster.jobs, cluster.local")
    assert heavy == []


@pytest.mark.subprocess
def test_help_of_every_command_loads_neither_torch_nor_ray():
    body = """
from cluster_testing import full_parser
for argv in (["--help"], ["cluster", "--help"], ["cluster", "up", "--help"], ["submit", "--help"],
             ["jobs", "--help"], ["jobs", "logs", "--help"]):
    try:
        full_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, argv
"""
    heavy, out = _heavy_after(body)
    assert heavy == []
    for word in ("cluster", "submit", "jobs"):
        assert word in out
