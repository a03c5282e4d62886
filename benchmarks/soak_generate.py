"""Soak: N random SIGKILLs of the driver and of pool and writer processes during toy generation
with the output on an S3 server (moto), then a final rerun; checks against a clean run.

    .venv/bin/python benchmarks/soak_generate.py [--kills 30] [--rows 40] [--seed 0]

Runs `segfactory generate` (each run starts its own local Ray) into ``s3://<bucket>/out-0``. Once the
run's actors are up, after a random delay, a victim is picked from the Ray processes of that run — the driver, a model-pool
actor (``ray::MapWorker(...Pool)``) or a writer actor (``ray::ShardWriterActor``), found by
Ray's process titles among the run's own descendants only — and SIGKILLed. A killed driver takes
its process group (its Ray instance) with it and the command is rerun, as a job runner would; a
killed pool or writer process must be survived by the running generate. A run that completes
its output with kills still to make moves the next kills to a fresh output (``out-<k>``). After
the last kill a final rerun finishes each output. Prints one JSON line: kills per kind, runs that failed without
their driver being killed, lost rows, duplicated rows, and shards byte-identical to a clean run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = {"pool": "Pool)", "writer": "ShardWriterActor"}  # Ray process titles: ray::<actor class>...


def generate_cmd(source: Path, out: str, rows: int) -> list[str]:
    return [
        sys.executable, "-m", "segfactory.cli", "generate", "--config", "seggen-toy", f"source.path={source}",
        f"output.path={out}", f"source.limit={rows}", "output.rows_per_shard=2", "imgsyn.samples_per_source=1",
        "masksyn.samples_per_caption=1", "ray.show_progress=false", "mask2img.resources.batch_size=2",
        "faults.batch_delay_s=0.2", "output.lease_ttl_s=20", "ray.no_progress_timeout_s=120"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=900)


def generate(source: Path, out: str, rows: int) -> subprocess.Popen:
    return subprocess.Popen(generate_cmd(source, out, rows), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def victims(proc: subprocess.Popen) -> dict[str, list[int]]:
    """The run's own processes by kind (never another run's or another user's Ray)."""
    import psutil

    found: dict[str, list[int]] = {"driver": [proc.pid], "pool": [], "writer": []}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        for kind, mark in KINDS.items():
            if title.startswith("ray::") and mark in title:
                found[kind].append(child.pid)
    return found


def wait_for_actors(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the run's pool or writer processes are up (or it ended): a kill before Ray is up
    can only hit the driver."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        found = victims(proc)
        if found["pool"] or found["writer"]:
            return
        time.sleep(0.5)


def kill_one(proc: subprocess.Popen, rng: random.Random) -> str | None:
    """SIGKILL one victim of a random kind that has one; returns the kind."""
    found = victims(proc)
    kinds = [k for k, pids in found.items() if pids and (k == "driver" or proc.poll() is None)]
    if proc.poll() is not None or not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "driver":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait(timeout=60)
    else:
        try:
            os.kill(rng.choice(found[kind]), signal.SIGKILL)
        except ProcessLookupError:
            return None
    return kind


def soak(source: Path, bucket: str, rows: int, kills: int, rng: random.Random) -> dict:
    """Kill until ``kills`` victims are down. A run that finishes with kills still to make has
    completed its output (later runs there would have nothing to kill): the next kills go to a
    fresh output, ``s3://BUCKET/out-<k>``. Each output gets a final rerun."""
    counts = {"driver": 0, "pool": 0, "writer": 0}
    failed_without_driver_kill, outputs = 0, []
    while sum(counts.values()) < kills:
        outputs.append(f"s3://{bucket}/out-{len(outputs)}")
        proc = generate(source, outputs[-1], rows)
        while sum(counts.values()) < kills:
            wait_for_actors(proc)
            time.sleep(rng.uniform(0, 6))  # then at a random point of the run
            kind = kill_one(proc, rng)
            if kind:
                counts[kind] += 1
            if proc.poll() is None:
                continue
            if kind != "driver":  # it finished (exit code 0 expected, counted below): its output is complete
                break
            proc = generate(source, outputs[-1], rows)  # the driver was killed: rerun, as a job runner would
        if proc.wait(timeout=900) != 0:  # the run that finished, or the last one started
            failed_without_driver_kill += 1
    finals = [run(generate_cmd(source, out, rows)).returncode for out in outputs]
    return {"kills": counts, "runs_failed_without_driver_kill": failed_without_driver_kill, "outputs": outputs,
            "final_exit": max(finals)}


def compare(reference: str, out: str) -> dict:
    """Lost and duplicated rows, and shards byte-identical to the clean run's."""
    import pyarrow.parquet as pq

    from core import storage
    from pipelines.commits import read_commits

    def files(uri: str) -> dict[str, bytes]:
        loc = storage.resolve(uri)
        return {f.name: storage.read_bytes(f) for f in storage.listdir(loc / "shards", ".parquet")}

    def ids(uri: str) -> list[str]:
        loc = storage.resolve(uri)
        return [sid for r in read_commits(loc) if r["file"]
                for sid in pq.read_table((loc / r["file"]).path, columns=["sample_id"],
                                         filesystem=loc.fs).column("sample_id").to_pylist()]

    ref_ids, got = ids(reference), ids(out)
    ref_files, got_files = files(reference), files(out)
    return {"rows_expected": len(ref_ids), "rows": len(got), "lost_rows": len(set(ref_ids) - set(got)),
            "duplicated_rows": len(got) - len(set(got)), "unexpected_rows": len(set(got) - set(ref_ids)),
            "shards": len(ref_files), "shards_identical": sum(got_files.get(n) == b for n, b in ref_files.items()),
            "extra_shard_files": sorted(set(got_files) - set(ref_files))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--rows", type=int, default=40, help="toy source rows (2 samples each, 2 rows per shard)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint already running (else moto starts here)")
    args = ap.parse_args(argv)
    from bench_summary import start_s3  # the same moto set-up as the summary benchmark

    server = None if args.endpoint else start_s3()
    if args.endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    try:
        from pyarrow import fs

        from pipelines.toy_data import make_toy_dataset

        bucket = f"soak-{args.seed}-{int(time.time())}"
        s3, _ = fs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
        s3.create_dir(bucket)
        source = make_toy_dataset(Path(tempfile.mkdtemp(prefix="soak-src-")) / "src", n_train=args.rows, n_val=2,
                                  size=64, seed=0)
        started = time.time()
        clean = run(generate_cmd(source, f"s3://{bucket}/clean", args.rows))
        assert clean.returncode == 0, clean.stderr[-2000:]
        result = soak(source, bucket, args.rows, args.kills, random.Random(args.seed))
        for out in result["outputs"]:  # summed over the outputs the kills went to
            for key, value in compare(f"s3://{bucket}/clean", out).items():
                result[key] = result.get(key, 0 if isinstance(value, int) else []) + value
        result["outputs"] = len(result["outputs"])
        result["wall_s"] = round(time.time() - started, 1)
        print(json.dumps(result))
        return result
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
