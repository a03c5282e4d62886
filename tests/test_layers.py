"""The import contracts of `.importlinter` (layers, independence, no cycles, no Ray in actors),
checked by import-linter over the whole tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
def test_ruff_is_clean():
    """ruff over the tree, complexity (C901 <= 15) included: CI runs it through make test."""
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    out = subprocess.run([exe, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:]


@pytest.mark.subprocess
def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.subprocess
def test_a_broken_layer_is_reported(tmp_path):
    """The check can fail: a copy of the contracts with core above actors breaks on real imports."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    text = (ROOT / ".importlinter").read_text().replace("    actors\n    core\n", "    core\n    actors\n", 1)
    config = tmp_path / "contracts.ini"
    config.write_text(text)
    out = subprocess.run([exe, "--no-cache", "--config", str(config), "--contract", "layers"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "actors." in out.stdout and "is not allowed to import" in out.stdout
