"""Scaling sweeps: val mIoU against the volume of synthetic data (``segfactory scaling``).

The same training recipe (a training YAML) runs at a fixed iteration budget for every
(volume, p_aug, seed) of a grid. Volume V trains on a nested subset of ONE synthetic dataset
(:mod:`training.subsets`); volume 0 is the real-only baseline, shared by every p_aug line.

The trials are a Ray Tune experiment (:mod:`training.scaling_tune`): a ``Tuner`` with a
``grid_search`` over :func:`plan_trials`, each trial a Ray Train run (:func:`training.recipe.run_train`),
``max_concurrent_trials`` from the cluster's CPUs/GPUs (:func:`concurrency`), retries through
``FailureConfig(max_failures)``, a rerun resumed with ``Tuner.restore``. The report is built from
the ``ResultGrid``. A sweep directory holding another sweep (see :func:`fingerprint`) is refused.

Sweep directory (``output.path``: a local path or a URI such as ``s3://bucket/sweeps/x``; the
trial run directories and every file below go there through :mod:`training.rundir`)::

    sweep.json         resolved sweep and training config, trial list, fingerprint
    tune/              Ray Tune's experiment state; tune/<name>/: the trial's Tune logs (TensorBoard ...)
    synthetic/         the dataset generated on demand (unless ``synthetic`` names one)
    trials/<name>/     one training run directory per trial; error.txt when it failed
    results.csv, fit.json, scaling.png    see training.scaling_report
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from core import storage
from core.config import ConfigError, RayConfig, Strict, first_error_line, merge
from core.storage import Location
from training.config import TrainConfig
from training.rundir import locate, read_json, subdirs, upload_dir, writable, write_json
from training.scaling_report import TRIALS

log = logging.getLogger("segfactory.scaling")

ROOT = Path(__file__).resolve().parents[1]


class GenerateOnDemand(Strict):
    """Making the synthetic samples a sweep needs, with the generation graph."""

    config: str = Field("", description="generation YAML that makes the dataset when it does not exist yet (e.g. pipelines/configs/seggen-toy.yaml)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of that config, e.g. [source.path=DIR]")


class SweepOutput(Strict):
    """Where the sweep goes (``output.path``, as for every command)."""

    path: str = Field("scaling-output", description="sweep directory: trials/, results.csv, fit.json, scaling.png")


class ToySource(Strict):
    """A toy real dataset made for the sweep (toy domain only)."""

    train: int = Field(200, ge=1, description="training images")
    val: int = Field(100, ge=1, description="validation images")
    size: int = Field(128, ge=16, description="image side")
    seed: int = Field(0, description="seed of the toy dataset")


class ScalingConfig(Strict):
    """A sweep over synthetic volume x p_aug x seed at a fixed iteration budget."""

    train_config: str = Field("training/configs/toy.yaml", description="base training YAML (relative: to the working directory, else the repo)")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the base training config, nested like it (e.g. train.iterations=300)")
    volumes: list[int] = Field(..., min_length=1, description="synthetic volumes; 0 = the real-only baseline")
    p_aug: list[float] = Field([0.6], min_length=1, description="mix ratios, one curve each (SegGen's optimum is 0.6)")
    gaps: list[float] | None = Field(None, description="generator quality axis (toy domain): one synthetic dataset per toy.gap, "
                                     "generated with generate.overrides + toy.gap=G, one curve per (p_aug, gap); None = one dataset")
    seeds: list[int] = Field([0, 1], min_length=1, description="repeats: the trial seed (model init, mixing, augmentation)")
    synthetic: str = Field("", description="synthetic dataset directory; empty = OUTPUT/synthetic")
    generate: GenerateOnDemand | None = Field(None, description="generate missing samples (same graph, same seeds); None = stop and say how many are missing")
    toy_source: ToySource | None = Field(None, description="make a toy real dataset in OUTPUT/toy-source, used as train.real.path and as the generation's source")
    output: SweepOutput = Field(default_factory=SweepOutput, description="output.path: the sweep directory "
                                "(`output=DIR`, the older spelling, still works)")
    max_concurrent: int | None = Field(None, ge=1, description="most trials at once; None = as many as the cluster's CPUs/GPUs allow")
    max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial (each resumes from the trial's last "
                              "checkpoint); a trial still failing is reported, the others go on")
    ray: RayConfig = Field(default_factory=lambda: RayConfig(show_progress=False), description="Ray runtime settings")

    @field_validator("output", mode="before")
    @classmethod
    def _output_alias(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value  # output=DIR == output.path=DIR

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError(f"volumes must be >= 0, got {v}")
        return sorted(set(v))

    @field_validator("p_aug")
    @classmethod
    def _p_aug(cls, v: list[float]) -> list[float]:
        if any(not 0 < p <= 1 for p in v):
            raise ValueError(f"p_aug values must be in (0, 1], got {v} (volume 0 is the real-only run)")
        return sorted(set(v))


@dataclass(frozen=True)
class Trial:
    volume: int
    p_aug: float | None  # None: volume 0, the real-only baseline of every p_aug line
    seed: int
    gap: float | None = None  # the generator's toy.gap when the sweep has that axis

    @property
    def name(self) -> str:
        mix = "real" if self.p_aug is None else f"p{self.p_aug:g}"
        gap = "" if self.gap is None else f"-g{self.gap:g}"
        return f"v{self.volume}-{mix}{gap}-s{self.seed}"


def plan_trials(cfg: ScalingConfig) -> list[Trial]:
    """Seed-major: a sweep stopped early already has whole curves for its first seeds."""
    return [Trial(v, None if v == 0 else p, s, None if v == 0 else g) for s in cfg.seeds for v in cfg.volumes
            for p in ([None] if v == 0 else cfg.p_aug) for g in ([None] if v == 0 else (cfg.gaps or [None]))]


def find_file(path: str) -> Path:
    """``path`` as given, else relative to the repo (configs named like ``training/configs/x.yaml``)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() or not (ROOT / p).exists() else ROOT / p


def base_train_config(cfg: ScalingConfig, real_path: str | None = None) -> TrainConfig:
    """The training YAML with ``train`` merged in; errors name the ``train.`` key."""
    path = find_file(cfg.train_config)
    if not path.is_file():
        raise ConfigError(f"train_config: no such file {cfg.train_config}")
    data = merge(yaml.safe_load(path.read_text()) or {}, cfg.train)
    if real_path:
        data = merge(data, {"real": {"path": real_path}})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"train.{first_error_line(exc, TrainConfig)}") from None


def trial_config(base: TrainConfig, trial: Trial, synthetic_paths: list[str], out: str | os.PathLike | Location) -> TrainConfig:
    out = locate(out, "output.path")
    update: dict[str, Any] = {"seed": trial.seed, "resume": True, "output": {"path": str(out / TRIALS / trial.name)}}
    if trial.volume == 0:
        update |= {"strategy": "real_only", "synthetic": {"paths": [], "volume": None, "live": None}}
    else:
        update |= {"strategy": "mix", "p_aug": trial.p_aug,
                   "synthetic": {"paths": synthetic_paths, "volume": trial.volume, "live": None}}
    return TrainConfig.model_validate(merge(base.model_dump(mode="json"), update))


def trial_configs(base: TrainConfig, trials: list[Trial], synthetic: dict[float | None, list[str]],
                  out: str | os.PathLike | Location) -> dict[str, TrainConfig]:
    """Each trial's config; ``synthetic`` maps a gap (None without the gap axis) to its dataset's
    paths. Volume 0, the real-only baseline, has no gap and reads no synthetic data."""
    return {t.name: trial_config(base, t, synthetic.get(t.gap, []), out) for t in trials}


def fingerprint(base: TrainConfig, synthetic_paths: list[str]) -> str:
    """What makes two trials comparable: the recipe and the synthetic data (not paths/runtime)."""
    recipe = base.model_dump(mode="json")
    for key in ("output", "resume", "ray", "debug", "max_failures", "seed", "strategy", "p_aug", "synthetic"):
        recipe.pop(key)
    recipe["real"].pop("path")
    # The dataset itself, not its extensions: growing it keeps every subset already trained on.
    data = _manifest(synthetic_paths[0]) if synthetic_paths else {}
    blob = json.dumps({"recipe": recipe, "synthetic": [data.get("config_hash"), data.get("rows")]}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_finished(run_dir: str | os.PathLike | Location, iterations: int) -> bool:
    final = read_json(locate(run_dir) / "final.json")
    return final is not None and final.get("final_step") == iterations


def trial_resources(t: TrainConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial keeps busy: its workers plus one Ray Data transform task.

    A worker reserves ``cpus_per_worker`` from Ray but computes on ``torch_threads`` cores; the
    larger counts. (Measured on 2 CPUs: two toy trials at once, each reserving 1 CPU, ran at
    1-3 steps/s each against 10.8 alone; a sweep one at a time finished sooner.)"""
    w = t.workers
    per_worker = max(w.cpus_per_worker, float(w.torch_threads or 1))
    return w.num_workers * per_worker + t.data.num_cpus, float(w.num_workers if w.use_gpu else 0)


def concurrency(cluster: dict[str, float], cpus: float, gpus: float, cap: int | None) -> int:
    n = math.floor(cluster.get("CPU", 0) / cpus + 1e-9)
    if gpus:
        n = min(n, math.floor(cluster.get("GPU", 0) / gpus + 1e-9))
    return max(1, min(n, cap or n))


# --- synthetic data: nested subsets of one dataset, generated on demand -----------------------


def _manifest(path: str | os.PathLike | Location) -> dict[str, Any] | None:
    return read_json(locate(path, "synthetic") / "manifest.json")


def _extensions(root: Location) -> list[Location]:
    return sorted(subdirs(root / "extensions", "copies-"), key=lambda p: int(p.name.split("-")[1]))


def synthetic_parts(root: str | os.PathLike | Location) -> list[Location]:
    """The dataset and its finished extensions (``root/extensions/*``), in copy order."""
    root = locate(root, "synthetic")
    return [p for p in [root, *_extensions(root)] if _manifest(p) is not None]


def _generate(gen_cfg) -> None:
    from pipelines.generate import run_generate

    log.info("generating %s ...", gen_cfg.output.path)
    result = run_generate(gen_cfg)
    log.info("generated %d samples in %s", result.manifest["rows"], gen_cfg.output.path)


def _extension(root: Location, parts: list[Location], missing: int):
    """Config of the next extension: the dataset's own graph with copies numbered on from the
    last ones, enough of them for ``missing`` more samples."""
    from pipelines.config import GenerateConfig
    from pipelines.graphs import get_graph

    base = GenerateConfig.model_validate(_manifest(root)["config"])
    # the graph's extendable methods: {method: (config section, key of its copy count)}
    keys = {sec: (sec, key) for sec, key in get_graph(base.pipeline).extendable}
    branches = [b for b, (sec, key) in keys.items() if getattr(getattr(base, sec), key)]
    if not branches:
        raise ConfigError(f"synthetic: {root} was made by the {base.pipeline} graph, which cannot be extended; "
                          f"{missing} samples are missing (lower volumes or generate a bigger dataset)")
    rows = {b: 0 for b in branches}
    next_copy = {b: 0 for b in branches}
    for part in parts:
        m = _manifest(part)
        pc = GenerateConfig.model_validate(m["config"])
        for b in branches:
            sec, key = keys[b]
            n, first = getattr(getattr(pc, sec), key), getattr(pc, sec).first_copy
            rows[b] += m.get("rows_per_method", {}).get(b, 0)
            next_copy[b] = max(next_copy[b], first + n)
    per_level = sum(rows[b] / next_copy[b] for b in branches)  # samples one more copy of each branch adds
    levels = max(1, math.ceil(missing / max(per_level, 1e-9)))
    first = min(next_copy.values())
    update: dict[str, Any] = {"output": {"path": str(root / "extensions" / f"copies-{first}-{first + levels - 1}")}}
    for b in branches:
        update[keys[b][0]] = {keys[b][1]: levels, "first_copy": next_copy[b]}
    return GenerateConfig.model_validate(merge(base.model_dump(mode="json"), update))


def prepare_synthetic(cfg: ScalingConfig, out: str | os.PathLike | Location, need: int, source_path: str | None,
                      gap: float | None = None) -> list[str]:
    """Directories holding at least ``need`` synthetic samples; generates them when allowed.
    ``gap``: the dataset of that toy generator quality (``OUTPUT/synthetic-gapG``)."""
    if need == 0:
        return []
    from core.config import load_config
    from pipelines.config import GenerateConfig

    out = locate(out, "output.path")
    if gap is not None:
        root = out / f"synthetic-gap{gap:g}"
        cfg = cfg.model_copy(update={"generate": cfg.generate and cfg.generate.model_copy(
            update={"overrides": [*cfg.generate.overrides, f"toy.gap={gap}"]})})
    else:
        root = locate(cfg.synthetic, "synthetic") if cfg.synthetic else out / "synthetic"
    if _manifest(root) is None:  # not there, or a generation that stopped midway: (re)run it
        if cfg.generate is None or not cfg.generate.config:
            raise ConfigError(f"synthetic: no finished dataset at {root} (no manifest.json) and no generate.config "
                              f"to make it; the largest volume needs {need} samples")
        extra = [f"source.path={source_path}"] if source_path else []
        _generate(load_config(GenerateConfig, find_file(cfg.generate.config),
                              [*extra, *cfg.generate.overrides, f"output.path={root}"]))
    for stale in _extensions(root):  # an extension that stopped midway
        if _manifest(stale) is None and (started := read_json(stale / "config.json")) is not None:
            _generate(GenerateConfig.model_validate(started["config"]))
    for _ in range(3):  # quality filters may drop some: top up at most a few times
        parts = synthetic_parts(root)
        have = sum(_manifest(p)["rows"] for p in parts)
        if have >= need:
            return [str(p) for p in parts]
        if cfg.generate is None:
            raise ConfigError(f"synthetic: {root} has {have} samples; the largest volume ({need}) needs "
                              f"{need - have} more (set generate.config to make them, or lower volumes)")
        _generate(_extension(root, parts, need - have))
    raise ConfigError(f"synthetic: {root} still has only {have} of {need} samples after generating more "
                      "(are the quality filters dropping most samples?)")


# --- the sweep ----------------------------------------------------------------------------------


def _toy_source(t: ToySource, dest: Location) -> str:
    """The toy real dataset of a sweep, made in ``dest`` (on a URI: made locally, copied up once)."""
    import tempfile

    from pipelines.toy_data import make_toy_dataset

    if dest.is_local:
        return str(make_toy_dataset(Path(dest.path), n_train=t.train, n_val=t.val, size=t.size, seed=t.seed))
    if not storage.exists(dest / "classes.txt"):
        with tempfile.TemporaryDirectory(prefix="segfactory-toy-") as tmp:
            made = make_toy_dataset(Path(tmp) / "toy", n_train=t.train, n_val=t.val, size=t.size, seed=t.seed)
            classes = (made / "classes.txt").read_bytes()
            (made / "classes.txt").unlink()
            upload_dir(made, dest)
            storage.write_bytes(dest / "classes.txt", classes)  # last: marks the copy complete
    return str(dest)


def _check_sweep_dir(out: Location, fp: str) -> dict[str, Any] | None:
    """The sweep.json already in ``out`` (None: a new sweep); another sweep's is a user error."""
    old = read_json(out / "sweep.json")
    if old is not None and old.get("fingerprint") != fp:
        raise ConfigError(f"output: {out} holds a sweep with another training recipe or synthetic dataset; "
                          "its trials would not be comparable (use a new output directory)")
    return old


def run_sweep(cfg: ScalingConfig) -> dict[str, Any]:
    """Run every unfinished trial as a Ray Tune experiment (:mod:`training.scaling_tune`), then
    write results.csv, fit.json and scaling.png from its ResultGrid."""
    import ray

    from core.runtime import init_ray, ray_log_level
    from training.scaling_report import render_report
    from training.scaling_tune import run_tuner

    started = time.time()
    out = writable(cfg.output.path, "output.path")
    storage.makedirs(out)
    source = _toy_source(cfg.toy_source, out / "toy-source") if cfg.toy_source is not None else None
    base = base_train_config(cfg, real_path=source)
    trials = plan_trials(cfg)
    init_ray(cfg.ray)
    gaps = cfg.gaps or [None]
    synthetic = {g: prepare_synthetic(cfg, out, max(cfg.volumes), source or base.real.path, g) for g in gaps}
    fp = fingerprint(base, synthetic[gaps[0]]) if cfg.gaps is None else hashlib.sha256(
        "".join(fingerprint(base, synthetic[g]) for g in gaps).encode()).hexdigest()[:16]
    old = _check_sweep_dir(out, fp)
    configs = trial_configs(base, trials, synthetic, out)
    write_json(out / "sweep.json", {
        "fingerprint": fp, "sweep": cfg.model_dump(mode="json"), "train": base.model_dump(mode="json"),
        "synthetic_paths": synthetic[gaps[0]] if cfg.gaps is None else {f"{g:g}": synthetic[g] for g in gaps}, "trials": [asdict(t) | {"name": t.name} for t in trials]})

    done = sum(is_finished(out / TRIALS / t.name, base.iterations) for t in trials)
    cpus, gpus = trial_resources(base)
    limit = concurrency(ray.cluster_resources(), cpus, gpus, cfg.max_concurrent)
    log.info("%d trials, %d already finished; running %d at once (%.2g CPU, %g GPU each), %d retries each",
             len(trials), done, limit, cpus, gpus, cfg.max_failures)
    results = run_tuner(out, [t.name for t in trials], {n: c.model_dump(mode="json") for n, c in configs.items()},
                        limit=limit, max_failures=cfg.max_failures,
                        previous=[t["name"] for t in old["trials"]] if old else None, verbose=0 if ray_log_level() else 1)
    report = render_report(out, results)
    report |= {"wall_s": round(time.time() - started, 1), "concurrency": limit}
    return report
