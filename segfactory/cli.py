"""``segfactory`` command line. Exit codes: 0 done; 2 bad command line or config;
3 finished but rejected more than ``validation.max_rejected_fraction``; 1 anything else.

Heavy libraries are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.config import ConfigError
from core.schema import FILTER_REASONS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command line: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2 itself
        raise UsageError(message)


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from pipelines.toy_data import make_toy_dataset

    try:
        path = make_toy_dataset(Path(args.out), n_train=args.train, n_val=args.val, size=args.size, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"toy source dataset (VOC layout) written to {path}")
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generate
    from pipelines.inputs import check_generate
    from pipelines.report import print_generate_summary

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    cfg, problems, notes = check_generate(cfg)  # before Ray starts: paths, layout, buckets, run dirs
    if args.dry_run:
        return _dry_run(cfg, args.format, problems, notes)
    if problems:
        raise ConfigError(problems[0])
    result = run_generate(cfg)
    print_generate_summary(result)
    return _exit_for(result)


def _dry_run(cfg, fmt: str, problems: list[str], notes: list[str]) -> int:
    """Print the resolved plan, problems included; exit 2 when it names problems."""
    from pipelines.dryrun import detect_gpus, dry_run, format_json, format_text

    plan = dry_run(cfg, *detect_gpus(cfg), input_problems=problems, input_notes=notes)  # GPUs: the cluster's with ray.address, else torch's count
    print(format_json(plan) if fmt == "json" else format_text(plan))
    return EXIT_USAGE if plan["problems"] else EXIT_OK


def _check_submitted_generate(args: argparse.Namespace) -> str | None:
    """``submit -- generate ...``: relative model paths in the config exist only here (the upload
    carries no weights): one line naming the key, before anything is submitted."""
    forwarded = args.command[1:] if args.command[:1] == ["--"] else args.command
    if forwarded[:1] == ["segfactory"]:
        forwarded = forwarded[1:]
    if forwarded[:1] != ["generate"] or "--dry-run" in forwarded:
        return None
    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.dryrun import submit_problems

    try:
        gen = build_parser().parse_args(forwarded)
    except UsageError as exc:
        return f"submit: generate: {exc}"
    from segfactory.configs import resolve_config

    problems = submit_problems(load_config(GenerateConfig, resolve_config(gen.config), gen.overrides))
    return f"submit: {problems[0]}" if problems else None


def _exit_for(result) -> int:
    if result.over_limit:
        m = result.manifest
        drops = ", ".join(f"{k}={v}" for k, v in m["drops_per_reason"].items() if k not in FILTER_REASONS)
        print(f"error: rejected {m['rejected_rows'] - m['filtered_rows']} of "
              f"{result.manifest['rejected_rows'] + result.manifest['rows']} rows "
              f"({result.rejected_fraction:.1%} > validation.max_rejected_fraction="
              f"{result.manifest['config']['validation']['max_rejected_fraction']}): {drops}",
              file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generate
    from pipelines.report import print_generate_summary
    from pipelines.toy_data import make_toy_dataset

    root = Path(args.out)
    source = make_toy_dataset(root / "toy-source", seed=0)
    print(f"toy source dataset: {source}")
    cfg = load_config(GenerateConfig, CONFIG_DIR / "seggen-toy.yaml",
                      [f"source.path={source}", f"output.path={root / 'synthetic'}", *args.overrides])
    result = run_generate(cfg)
    print_generate_summary(result)
    if _exit_for(result) != EXIT_OK or args.no_train:
        return _exit_for(result)
    from training.demo import train_real_vs_mix

    print("training a tiny SegFormer on the toy domain: real only, then mixed with the synthetic data ...",
          flush=True)
    trained = train_real_vs_mix(source, result.out, root / "train")
    print(demo_conclusion(trained, root))
    return EXIT_OK


# Reruns of one seed give the same mIoU (augmentation is keyed by sample id, epoch and seed; measured
# spread 0.0000). What one seed per arm cannot resolve is the spread *across* seeds: in the toy
# scaling sweep (250 steps, 2 seeds per trial) trials of one arm differed by up to 0.06 mIoU.
SEED_SPREAD = 0.06


def demo_conclusion(trained: dict, root: Path) -> str:
    """The demo's last lines: both numbers, what they can and cannot show, where to look."""
    diff = trained["miou_mix"] - trained["miou_real_only"]
    return "\n".join([
        f"toy val mIoU after {trained['iterations']} steps: real only {trained['miou_real_only']:.3f}, "
        f"mixed with synthetic (p_aug={trained['p_aug']}) {trained['miou_mix']:.3f} ({diff:+.3f})",
        "  what this shows: the whole path runs (toy source -> SegGen graph -> dataset -> Ray Train).",
        "  what it cannot show: which arm is better. A rerun repeats a seed's numbers, but one seed per arm",
        f"  does not rank them: across seeds the toy sweep's trials moved by up to {SEED_SPREAD:.2f} mIoU.",
        "  to compare data, sweep seeds and volumes: segfactory scaling --config scaling-toy",
        "where to look:",
        f"  segfactory inspect {root / 'synthetic'}    # counts, class frequencies, contact sheet",
        f"  {root / 'train'}/{{real_only,mix}}/metrics.csv, final.json    # training curves and per-class IoU",
        "  Ray's full logs: /tmp/ray/session_latest/logs   (rerun with --verbose to see them here)",
    ])


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.report import inspect_dataset

    if args.format:  # a source dataset: the same page, from the source readers
        from pipelines.html_report import render_html, source_report, write_html
        from pipelines.inputs import source_problems

        if problems := source_problems(args.dataset, args.format, "DATASET"):
            raise ConfigError(problems[0])
        report = source_report(args.dataset, args.format, args.split, cards=args.cards)
        print(f"source dataset: {args.dataset} ({args.format}): {report['counts']['rows']} rows, "
              f"{report['counts']['rejected']} the index rejected")
        for name, share in sorted(zip(report["classes"], report["frequencies"], strict=True), key=lambda t: -t[1]):
            if share > 0:
                print(f"  {name:<20} {share:.3f}")
        if args.html:
            print(f"report: {write_html(render_html(report), args.html)}")
        return EXIT_OK
    inspect_dataset(args.dataset, n_samples=args.samples, sheet=args.sheet)
    from pipelines.html_report import rejected_rows

    for row in rejected_rows(args.dataset, limit=10, thumbnails=False):  # what to look at first
        print(f"rejected {row['id']}: {row['reason']}" + (f" ({row['path']})" if row["path"] else ""))
    if args.html:
        from pipelines.html_report import dataset_report, render_html, write_html

        print(f"report: {write_html(render_html(dataset_report(args.dataset, cards=args.cards)), args.html)}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from pipelines.export import export_dataset

    result = export_dataset(args.dataset, args.format, args.out, overwrite=args.overwrite,
                            val_fraction=args.val_fraction)
    rows = ", ".join(f"{k} {v}" for k, v in result["rows"].items() if v)
    print(f"exported {result['shards']} shard(s) as {result['format']} to {result['out']}: {rows or 'no rows'}")
    return EXIT_OK


def _cmd_configs(args: argparse.Namespace) -> int:
    from segfactory.configs import format_configs, resolve_config, shipped_configs

    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return EXIT_OK
    print(format_configs(shipped_configs()))
    return EXIT_OK


GENERATE_EPILOG = """\
--config takes a path or a shipped config's name (`segfactory configs` lists them).
main keys (key=value overrides, values parse as YAML; unknown keys are an error):
  pipeline                     seggen | imgsyn | masksyn | factory | ...
  preset                       toy | tiny | sdxl | sd15 | sdxl-random
  seed                         run seed (sample seeds derive from it and sample_id)
  source.path, source.format   the labelled dataset: voc | ade20k | coco | folder | parquet | captions
  source.classes=[a,b,...]     class names when the folder has no classes.txt
  source.split, source.limit   which split, how many source rows
  output.path                  where the dataset goes (a rerun resumes; a different config is refused)
  imgsyn.samples_per_source    K images per real mask
  masksyn.samples_per_caption  M new masks per caption
  validation.max_rejected_fraction   above it the run exits 3
  <stage>.resources.{batch_size,min_actors,max_actors,num_gpus}   per model pool
  ray.address, ray.show_progress
exit codes: 0 done; 2 bad command line, config or input (one line saying what to fix);
  3 finished but rejected more than validation.max_rejected_fraction; 1 anything else.
"""


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segfactory", description="Synthetic segmentation data factory on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="everything: debug logs, Ray's and Ray Train's own lines (default: one line per event)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="toy source → SegGen (toy preset) → dataset → short training, real only vs mixed")
    p.add_argument("--out", default="demo-output", help="directory for the demo's data (default: demo-output)")
    p.add_argument("--no-train", action="store_true", help="stop after generating (skip the training comparison)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the generation config")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("toy-data", help="write a toy source dataset in VOC layout")
    p.add_argument("out")
    p.add_argument("--train", type=_count, default=200, help="training samples (>= 0)")
    p.add_argument("--val", type=_count, default=100, help="validation samples (>= 0)")
    p.add_argument("--size", type=int, default=128, help="image side (>= 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("generate", help="run a generation graph from a config", epilog=GENERATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a shipped config's name (seggen-toy) or a YAML path")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan (stages, resources, models, "
                   "GPUs needed, problems) and exit: 2 when it names problems; starts no Ray, loads no model")
    p.add_argument("--format", choices=("text", "json"), default="text", help="dry-run output format")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", help="counts, class frequencies and a contact sheet of a dataset")
    p.add_argument("dataset")
    p.add_argument("--samples", type=int, default=16, help="samples in the contact sheet")
    p.add_argument("--sheet", default=None, help="PNG path (default: DATASET/contact_sheet.png)")
    p.add_argument("--html", default=None, metavar="OUT",
                   help="also write a static, self-contained HTML report (sample cards with mask overlays "
                   "filtered by class/method/source, rejected rows, class frequencies beside the source's, "
                   "score histograms): a path or URI")
    p.add_argument("--cards", type=int, default=120, help="sample cards in the HTML report (default 120)")
    p.add_argument("--format", default=None, choices=("voc", "ade20k", "folder", "parquet"),
                   help="DATASET is a source dataset in this layout (not a `generate` output)")
    p.add_argument("--split", default=None, help="split of a source dataset (--format)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="write a dataset as VOC / ADE20K / Cityscapes / folder layout, COCO JSON "
                       "or a Hugging Face dataset with its card (Ray Data; URIs on both sides)",
                       description="DATASET: the output.path of `segfactory generate`. OUT must be empty "
                       "(or --overwrite). Formats: voc (JPEGImages/, SegmentationClass/ palette PNGs, "
                       "ImageSets/Segmentation/*.txt), ade20k (images|annotations/{training,validation}/, "
                       "value = class id + 1, 0 = other), cityscapes (leftImg8bit/, gtFine/*_labelTrainIds.png "
                       "and *_color.png), folder (images|masks/<split>/), coco (images/<split>/, "
                       "annotations/semantic_<split>.json, RLE per class, category_id = class id + 1), hf "
                       "(data/*.parquet + README.md card; datasets.load_dataset(OUT)).")
    p.add_argument("dataset", help="a segfactory dataset directory or URI")
    p.add_argument("--format", required=True, choices=("voc", "ade20k", "cityscapes", "folder", "coco", "hf"))
    p.add_argument("out", help="output directory or URI (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of samples in the val split, picked by a stable hash of sample_id (default 0)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("configs", help="the shipped configs with their purpose (--config accepts their names)")
    p.add_argument("--show", metavar="NAME", default=None, help="print one config's YAML")
    p.set_defaults(func=_cmd_configs)

    from cluster.cli import add_cluster_commands
    from training.cli import add_training_commands

    add_training_commands(sub)
    add_cluster_commands(sub)
    _accept_verbose_everywhere(sub)
    return parser


def _accept_verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """`segfactory demo --verbose` as well as `segfactory --verbose demo` (SUPPRESS: the
    subcommand's flag only sets ``verbose`` when given, leaving the top-level one otherwise)."""
    for parser in sub.choices.values():
        if not any("--verbose" in a.option_strings for a in parser._actions):
            parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="show every log line, Ray's included")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_verbose_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if argv is None:  # the `segfactory` command itself; a caller passing argv keeps its own logging
        from segfactory.logs import setup_logging

        setup_logging(args.verbose)
    try:
        if isinstance(getattr(args, "config", None), str):  # every command's --config: name or path
            from segfactory.configs import resolve_config

            args.config = str(resolve_config(args.config))
        if args.func.__name__ == "_cmd_submit" and (problem := _check_submitted_generate(args)):
            raise ConfigError(problem)
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - a named error is better than a traceback for users
        if isinstance(exc, _user_errors()):  # the user's input, named in the message: how to fix it
            logging.getLogger("segfactory").debug("user error", exc_info=exc)
            print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                  file=sys.stderr)
            return EXIT_USAGE
        logging.getLogger("segfactory").exception("failed: %s", exc)
        return EXIT_ERROR


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2, one line): config, source, output, checkpoint."""
    from core.storage import StorageError  # includes a corrupt commit record (pipelines.commits)
    from pipelines.export import ExportError
    from pipelines.lease import LeaseHeld
    from pipelines.sources import SourceError
    from pipelines.writer import OutputConflict

    return (ConfigError, SourceError, OutputConflict, StorageError, ExportError, LeaseHeld)


if __name__ == "__main__":
    sys.exit(main())
