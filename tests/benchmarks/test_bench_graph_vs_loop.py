"""benchmarks/bench_graph_vs_loop.py --smoke: both graph arms and the plain loop make the same samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_graph_vs_loop.py"


def test_bench_graph_vs_loop_smoke(ray_local, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_graph_vs_loop", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--out", str(tmp_path / "rows.json")])
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"graph", "colocated", "loop"}
    assert by["graph"]["rows"] == by["colocated"]["rows"] == by["loop"]["rows"] == 8  # 4 sources x (1 + 1)
    for r in rows:
        assert r["samples_per_s"] > 0 and r["gpu_busy_fraction"] is None  # no nvidia-smi here
    assert by["loop"]["load_s"] > 0
    assert "graph / loop samples_per_s:" in capsys.readouterr().out
