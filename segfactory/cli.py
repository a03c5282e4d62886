"""``segfactory`` command line. Exit codes: 0 done; 2 bad command line or config;
3 finished but rejected more than ``validation.max_rejected_fraction``; 1 anything else.

Heavy libraries are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.schema import FILTER_REASONS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command line: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2 itself
        raise UsageError(message)


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from pipelines.toy_data import make_toy_dataset

    path = make_toy_dataset(Path(args.out), n_train=args.train, n_val=args.val, size=args.size, seed=args.seed)
    print(f"toy source dataset (VOC layout) written to {path}")
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.config import GenerateConfig, load_config
    from pipelines.generate import run_generate
    from pipelines.report import print_generate_summary

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    result = run_generate(cfg)
    print_generate_summary(result)
    return _exit_for(result)


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
    from pipelines.config import GenerateConfig, load_config
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

    print("training a tiny SegFormer on the toy domain: real only, then mixed with the synthetic data ...")
    trained = train_real_vs_mix(source, result.out, root / "train")
    print(f"toy val mIoU  real only: {trained['miou_real_only']:.3f}   "
          f"mixed (p_aug={trained['p_aug']}): {trained['miou_mix']:.3f}   "
          f"({trained['iterations']} steps each; runs in {root / 'train'})")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.report import inspect_dataset

    inspect_dataset(args.dataset, n_samples=args.samples, sheet=args.sheet)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segfactory", description="Synthetic segmentation data factory on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="toy source → SegGen (toy preset) → dataset → short training, real only vs mixed")
    p.add_argument("--out", default="demo-output", help="directory for the demo's data (default: demo-output)")
    p.add_argument("--no-train", action="store_true", help="stop after generating (skip the training comparison)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the generation config")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("toy-data", help="write a toy source dataset in VOC layout")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=200, help="training samples")
    p.add_argument("--val", type=int, default=100, help="validation samples")
    p.add_argument("--size", type=int, default=128, help="image side")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("generate", help="run a generation graph from a config")
    p.add_argument("--config", required=True, help="YAML config, e.g. pipelines/configs/seggen-toy.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", help="counts, class frequencies and a contact sheet of a dataset")
    p.add_argument("dataset")
    p.add_argument("--samples", type=int, default=16, help="samples in the contact sheet")
    p.add_argument("--sheet", default=None, help="PNG path (default: DATASET/contact_sheet.png)")
    p.set_defaults(func=_cmd_inspect)

    from cluster.cli import add_cluster_commands
    from training.cli import add_training_commands

    add_training_commands(sub)
    add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a named error is better than a traceback for users
        from pipelines.sources import SourceError
        from pipelines.storage import StorageError
        from pipelines.writer import OutputConflict

        if isinstance(exc, OutputConflict | SourceError | StorageError):  # the user's input, named in the message
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        logging.getLogger("segfactory").exception("failed: %s", exc)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
