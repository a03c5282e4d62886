"""``segfactory train``, ``evaluate``, ``predict`` and ``scaling``, registered on the main CLI's subparsers.

Handlers return the exit code; a bad config raises :class:`core.config.ConfigError`
(exit 2 in the main CLI). Heavy imports happen inside the handlers so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

from core.config import ConfigError

EXIT_OK, EXIT_ERROR = 0, 1


def _check_inputs(*checks: tuple, classes: list[str] | None = None) -> None:
    """(path, format, key) of each input: the first problem as one line (exit 2), before Ray
    starts (a wrong folder level gets a hint; see :mod:`pipelines.inputs`)."""
    from pipelines.inputs import source_problems

    for path, fmt, key in checks:
        if path and (problems := source_problems(path, fmt, key, classes=classes)):
            raise ConfigError(problems[0])


def _cmd_train(args: argparse.Namespace) -> int:
    from core.config import load_config
    from training.config import TrainConfig
    from training.metrics import format_table
    from training.recipe import run_train
    from training.rundir import locate

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    if args.print_config:  # the resolved config, in the keys the YAML takes; nothing starts
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return EXIT_OK
    _check_inputs((cfg.real.path, cfg.real.format, "real.path"),
                  *[(p, "parquet", "synthetic.paths") for p in cfg.synthetic.paths], classes=cfg.real.classes)
    final = run_train(cfg)
    print(f"run directory: {locate(cfg.output.path, 'output.path')}")
    if final.get("pretrain"):
        evals = final["pretrain"]["evals"]
        print(f"pre-training (synthetic only): {final['pretrain']['last_step']} steps"
              + (f", val mIoU {evals[-1]['miou']:.4f}" if evals else ""))
    print(f"{final['strategy']}: {final['final_step']} steps, {final.get('steps_per_s') or 0:.2f} steps/s, "
          f"data-wait {final.get('data_wait_fraction') or 0:.1%}, synthetic share {final.get('synthetic_fraction') or 0:.2f}")
    print(format_table({"per_class_iou": final["per_class_iou"], "miou": final["miou"], "pixel_acc": final["pixel_acc"]}))
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.protocol == "fss":
        return _cmd_evaluate_fss(args)
    if not args.checkpoint:
        raise ConfigError("--checkpoint: required (the semantic protocol scores a trained model)")
    from training.evaluate import run_evaluate
    from training.metrics import format_table

    _check_inputs((args.data, args.format, "--data"))
    result = run_evaluate(args.checkpoint, args.data, format=args.format, split=args.split,
                          num_workers=args.workers, batch_size=args.batch_size, out=args.out,
                          eval_overrides=_eval_overrides(args))
    print(f"checkpoint {result['checkpoint']} (step {result['step']}) on {result['data']} [{result['split']}], "
          f"{result['samples']} samples, {result['num_workers']} worker(s)")
    print(format_table(result))
    print(f"written to {result['json']}")
    return EXIT_OK


def _cmd_evaluate_fss(args: argparse.Namespace) -> int:
    """Few-shot episodes (training.fss): per fold mIoU and FB-IoU, their means."""
    from training.fss import run_fss

    backbone = None
    if args.fss_backbone:
        bid, _, rev = args.fss_backbone.partition("@")
        backbone = {"local_path": bid} if not rev else {"model_id": bid, "revision": rev}
    result = run_fss(args.data, args.format, args.split, args.benchmark, args.folds, args.shots, args.episodes,
                     args.seed, args.fss_model, backbone, args.out)
    for f in result["folds"]:
        print(f"fold {f['fold']}: mIoU {f['miou']:.4f}, FB-IoU {f['fb_iou']:.4f} ({f['episodes']} episodes)")
    print(f"{result['benchmark']} {result['shots']}-shot ({result['model']}): mean mIoU {result['miou']:.4f}, "
          f"FB-IoU {result['fb_iou']:.4f}")
    print(f"written to {result['json']}")
    return EXIT_OK


def _eval_overrides(args: argparse.Namespace) -> dict:
    """--mode/--short-side/--crop-size/--stride/--flip/--scales given on the command line."""
    keys = ("mode", "short_side", "crop_size", "stride", "flip", "scales")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    """Flags that replace keys of the checkpoint's eval protocol (training.config.EvalConfig)."""
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="whole image or sliding windows")
    p.add_argument("--short-side", type=int, default=None, help="resize the short side to this (ADE20K: 512)")
    p.add_argument("--crop-size", type=int, default=None, help="slide: window side")
    p.add_argument("--stride", type=int, default=None, help="slide: window step")
    p.add_argument("--flip", action="store_true", default=None, help="test-time horizontal flip")
    p.add_argument("--scales", type=lambda v: [float(x) for x in v.split(",")], default=None,
                   help="test-time scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")


def _cmd_predict(args: argparse.Namespace) -> int:
    from training.predict import run_predict

    _check_inputs((args.data, args.format, "--data"))
    summary = run_predict(args.checkpoint, args.data, args.out, format=args.format, split=args.split,
                          batch_size=args.batch_size, actors=args.actors, eval_overrides=_eval_overrides(args),
                          color=args.color)
    print(f"{summary['images']} masks from {summary['checkpoint']} (step {summary['step']}) written to {summary['out']}")
    return EXIT_OK


def _cmd_scaling(args: argparse.Namespace) -> int:
    from training.scaling_report import format_report, render_report

    if args.report:
        if args.config or args.overrides:
            raise ConfigError("--report re-renders a finished sweep: give it alone, without --config or overrides")
        report = render_report(args.report)  # a directory or a URI
        if args.html:
            from pipelines.html_report import sweep_html, write_html

            print(f"report: {write_html(sweep_html(args.report), args.html)}")
    elif args.config:
        from core.config import load_config
        from training.scaling import ScalingConfig, run_sweep

        report = run_sweep(load_config(ScalingConfig, args.config, args.overrides))
    else:
        raise ConfigError("scaling: give --config YAML (run a sweep) or --report DIR (re-render one)")
    print(format_report(report))
    print(f"written: {report['out']}/results.csv, fit.json, scaling.png")
    if report["failed"]:
        print(f"error: {len(report['failed'])} trial(s) failed: {', '.join(report['failed'])} (see trials/<name>/error.txt); "
              "rerun to retry only them", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _cmd_finetune(args: argparse.Namespace) -> int:
    from core.config import load_config
    from training.finetune.config import FinetuneConfig
    from training.finetune.run import run_finetune

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    cfg = load_config(FinetuneConfig, args.config, overrides)
    _check_inputs((cfg.source.path, cfg.source.format, "source.path"), classes=cfg.source.classes)
    final = run_finetune(cfg)
    print(f"{final['kind']}: {final['final_step']} steps, {final.get('steps_per_s') or 0:.2f} steps/s, "
          f"held-out loss {final['val_loss_initial']} -> {final['val_loss_final']}"
          + (f", colour fidelity {final['val_fidelity']:.3f}" if final.get("val_fidelity") is not None else ""))
    print(f"model: {final['model']}")
    return EXIT_OK


def _add_evaluate(subparsers) -> None:
    """``evaluate``: the semantic protocol (mIoU of a checkpoint) or few-shot episodes."""
    p = subparsers.add_parser("evaluate", help="mIoU / per-class IoU / pixel accuracy of a checkpoint on a real split")
    p.add_argument("--checkpoint", default=None, help="run directory (its final checkpoint: the last step, the model "
                   "predict uses for the same RUN), a checkpoint directory or RUN/best (the semantic protocol)")
    p.add_argument("--data", required=True, help="real dataset directory")
    p.add_argument("--protocol", choices=["semantic", "fss"], default="semantic",
                   help="semantic = mIoU of a checkpoint; fss = few-shot episodes (PASCAL-5i / COCO-20i folds)")
    p.add_argument("--benchmark", choices=["pascal-5i", "coco-20i"], default="pascal-5i", help="fss: fold split")
    p.add_argument("--folds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2, 3], help="fss: e.g. 0,1,2,3")
    p.add_argument("--shots", type=int, default=1, help="fss: support images per episode (1 or 5)")
    p.add_argument("--episodes", type=int, default=1000, help="fss: episodes per fold (BAM/HDMNet: 1000 PASCAL, 10000 COCO)")
    p.add_argument("--seed", type=int, default=0, help="fss: episode draw seed")
    p.add_argument("--fss-model", default="prototype", help="fss: prototype (DINOv2 matcher), tiny (random, tests) "
                   "or package.module:factory (factory(classes) -> a model with predict(supports, masks, query))")
    p.add_argument("--fss-backbone", default=None, help="fss prototype: DINOv2 as a local path or id@revision")
    p.add_argument("--format", default="voc", choices=["voc", "ade20k", "coco", "folder", "parquet"], help="source layout (default voc)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (confusion matrices are all-reduced)")
    p.add_argument("--batch-size", type=int, default=8, help="images per worker per batch")
    p.add_argument("--out", default=None, help="JSON path (default CHECKPOINT/eval-SPLIT.json)")
    _add_protocol_flags(p)
    p.set_defaults(func=_cmd_evaluate)


def add_training_commands(subparsers) -> None:
    """Register ``train``, ``evaluate``, ``predict`` and ``scaling`` on the main parser's subparsers."""
    p = subparsers.add_parser("train", help="train a segmentation model on real and/or synthetic data (Ray Train)")
    p.add_argument("--config", required=True, help="YAML config, e.g. training/configs/toy.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit (starts no Ray)")
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value overrides, e.g. real.path=DIR synthetic.paths=[OUT] strategy=mix p_aug=0.6 output.path=RUN")
    p.set_defaults(func=_cmd_train)

    _add_evaluate(subparsers)

    p = subparsers.add_parser("predict", help="one mask PNG per image (same ids) from a trained model")
    p.add_argument("--checkpoint", required=True, help="run directory (its final checkpoint, the model evaluate scores for the same RUN), a "
                   "checkpoint directory, or RUN/best (the best by val mIoU)")
    p.add_argument("--data", required=True, help="folder of images, or a dataset directory (with --format)")
    p.add_argument("--out", required=True, help="output folder: OUT/<id>.png")
    p.add_argument("--format", default="images", choices=["images", "voc", "ade20k", "coco", "folder", "parquet"],
                   help="images = every image file under --data (default); else a source layout")
    p.add_argument("--split", default=None, help="split of a dataset --format (e.g. val)")
    p.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    p.add_argument("--actors", type=int, default=1, help="model actors (Ray Data actor pool)")
    p.add_argument("--color", action="store_true", help="also write OUT/color/<id>.png: palette PNGs in VOC colours "
                   "(same class-id pixel values; the plain ones look black in an image viewer)")
    _add_protocol_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser("scaling", help="sweep mIoU against synthetic volume x p_aug x seed, fit a saturating power law, plot")
    p.add_argument("--config", default=None, help="sweep YAML, e.g. training/configs/scaling-toy.yaml")
    p.add_argument("--report", default=None, metavar="DIR", help="re-render results.csv, fit.json and scaling.png of a sweep directory")
    p.add_argument("--html", default=None, metavar="OUT", help="with --report: also a static HTML page of every trial "
                   "and the plot (a path or URI)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. volumes=[0,1000] train.iterations=300 output.path=DIR")
    p.set_defaults(func=_cmd_scaling)

    p = subparsers.add_parser("finetune", help="fine-tune a generator on Ray Train: Text2Mask, Mask2Img ControlNet, LoRA, "
                              "or AlignDiff's textual inversion (an embedding bank for aligndiff.bank=RUN)")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. training/configs/text2mask-tiny.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.path")
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value overrides, e.g. source.path=DIR source.format=voc output.path=OUT iterations=100")
    p.set_defaults(func=_cmd_finetune)
