"""The scaling sweep's trials as a Ray Tune experiment (``SWEEP/tune``).

One Tune trial per planned trial (``grid_search`` over the names :func:`training.scaling.plan_trials`
gives). A trial is a Tune function trainable that runs one Ray Train run
(:func:`training.recipe.run_train`, a ``TorchTrainer``): Ray Train v2's way to tune, where the
trainable is a light driver and the trainer's own placement group reserves each trial's workers
(CPUs/GPUs; several GPUs per trial work the same way). The trainable reserves no CPU, only
``DRIVER_MEMORY`` (and, for a local sweep directory, a sliver of the driver node, so it runs where
that directory is). Training metrics reach Tune through Train's ``TuneReportCallback``, so Tune's
default loggers write each trial's TensorBoard/CSV/JSON logs to ``SWEEP/tune/<trial>/``.

State: Tune's experiment state (``SWEEP/tune``) says which trials finished; ``Tuner.restore``
resumes it (errored trials restarted). The trial run directories (``SWEEP/trials/<name>``) keep
Ray Train's checkpoints: a restarted trial resumes from its last one, and a trial whose
``final.json`` holds the full budget is reported without training again.
"""

from __future__ import annotations

import logging
from typing import Any

from core import storage
from core.storage import Location
from training.rundir import locate, read_json, read_text
from training.scaling_report import TRIALS

log = logging.getLogger("segfactory.scaling")

TUNE = "tune"  # the sweep directory's folder of Tune's experiment state and trial logs
DRIVER_MEMORY = 256 * 2**20  # what a trial's driver process (Python, torch, Ray Train's client) holds
RESULT_KEYS = ("final_step", "iterations", "miou", "pixel_acc", "per_class_iou", "classes", "wall_s",
               "synthetic_fraction", "checkpoint")


def _tune_report_callback():
    """Train's ``TuneReportCallback`` passing on the scalars the run's own TensorBoard gets
    (not the confusion matrix), with the training step as Tune's ``timesteps_total``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.runlog import tb_scalars

    class Scalars(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if "step" in m:
                super().after_report(run_context, [{**tb_scalars(m), "timesteps_total": m["step"]}], checkpoint)

    return Scalars()


def sweep_trial(config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """Tune trainable: the trial ``config["trial"]``, trained (or resumed) by Ray Train; its
    last report is the trial's final.json (the part the report reads)."""
    from ray import tune

    from training.config import TrainConfig

    cfg = TrainConfig.model_validate(configs[config["trial"]])
    run = locate(cfg.output.path, "output.path")
    storage.makedirs(run)
    storage.remove(run / "error.txt")
    final = read_json(run / "final.json")
    if not final or final.get("final_step") != cfg.iterations:  # else trained by an earlier sweep (or one before Tune)
        from training.recipe import run_train

        try:
            final = run_train(cfg, callbacks=[_tune_report_callback()])
        except Exception as exc:  # the trial's error.txt, in its run directory; Tune records it too
            storage.write_text(run / "error.txt", f"{type(exc).__name__}: {exc}\n")
            raise
    tune.report({k: final.get(k) for k in RESULT_KEYS} | {"trial": config["trial"]})


def driver_resources(out: Location):
    """The Tune trial's own reservation (the driver; its Train workers reserve theirs)."""
    import ray
    from ray import tune

    pin = {f"node:{ray.util.get_node_ip_address()}": 0.001} if out.is_local else {}
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY, **pin}])


def _log_trials():
    from ray.tune import Callback

    class TrialLines(Callback):
        """One line per trial that ends, as the sweep logged before Tune."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            log.info("trial %s finished: val mIoU %.4f (%.0f s)", r.get("trial", trial.trial_id),
                     r.get("miou") or float("nan"), r.get("wall_s") or 0)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.error("trial %s failed (attempt %d); see its error.txt", trial.config.get("trial"), trial.num_failures)

    return TrialLines()


def run_tuner(out: Location, names: list[str], configs: dict[str, dict[str, Any]], *, limit: int,
              max_failures: int, previous: list[str] | None = None, verbose: int = 0) -> dict[str, dict[str, Any]]:
    """Run (or resume) the sweep's Tune experiment in ``out/tune``; returns, per trial name, the
    ResultGrid's final result (``{"final": {...}}``) or its error (``{"error": "..."}``).
    ``previous``: the trial names of the sweep that left the state (its sweep.json)."""
    from ray import tune

    exp = out / TUNE
    fs = {} if exp.is_local else {"storage_filesystem": exp.fs}
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, configs=configs), driver_resources(out))
    restore = previous == names and tune.Tuner.can_restore(exp.path, **fs)
    if restore:
        log.info("resuming the Tune experiment in %s", exp)
        tuner = tune.Tuner.restore(exp.path, trainable, restart_errored=True, **fs)
    else:
        if storage.exists(exp):  # the state of another grid (volumes or seeds changed): start over
            storage.remove_tree(exp)
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(names)},
            tune_config=tune.TuneConfig(max_concurrent_trials=limit, trial_dirname_creator=lambda t: t.config["trial"],
                                        trial_name_creator=lambda t: t.config["trial"]),
            run_config=tune.RunConfig(name=TUNE, storage_path=out.path, **fs, verbose=verbose, callbacks=[_log_trials()],
                                      failure_config=tune.FailureConfig(max_failures=max_failures)))
    results: dict[str, dict[str, Any]] = {}
    for r in tuner.fit():
        name = r.config["trial"]
        if r.error is not None:  # the trial's error.txt; written here when its process died first
            written = out / TRIALS / name / "error.txt"
            if (error := read_text(written)) is None:
                cause = getattr(r.error, "cause", None) or r.error  # a RayTaskError wraps the trial's own
                error = f"{type(cause).__name__}: {cause}\n"
                storage.write_text(written, error)
            results[name] = {"error": error}
        elif r.metrics and r.metrics.get("final_step") is not None:
            results[name] = {"final": {k: r.metrics.get(k) for k in RESULT_KEYS}}
    return results
