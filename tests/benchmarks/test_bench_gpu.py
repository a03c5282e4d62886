"""benchmarks/bench_gpu.py --smoke: the GPU check runs end to end on a CPU with the tiny preset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_smoke(ray_local, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--out", str(tmp_path / "rows.json")])
    m2i = [r for r in rows if r["part"] == "mask2img"]
    settings = ("sdpa", "no-sdpa", "sdpa+channels-last", "sdpa+fused-qkv")  # compile settings: GPU only
    assert {(r["setting"], r["batch"]) for r in m2i} == {(s, b) for s in settings for b in (1, 2)}
    for r in m2i:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert r["unet_mfu"] is None and r["peak_mem_gib"] is None  # no GPU peak / memory on CPU
    flops = {(r["setting"], r["batch"]): r["unet_controlnet_tflop_per_step"] for r in m2i}
    # counted FLOPs scale with the batch (CFG doubles both), and SDPA counts as attention FLOPs too
    assert flops[("sdpa", 2)] == flops[("sdpa", 1)] * 2 > 0
    graph = rows[-1]
    assert graph["part"] == "seggen-graph" and graph["rows"] == 2  # 1 source: 1 ImgSyn + 1 MaskSyn
    assert graph["gpu_busy_fraction"] is None  # no nvidia-smi here
    assert (tmp_path / "rows.json").is_file()
