"""`segpipe` command line: a table of commands, each run by its entry module.

`COMMANDS` maps a command to its entry: `pipeline/stages/` for the DVC stages and the user's
`infer`/`export`, `pipeline/commands/` for the tools, the top-level `benchmarks` package for `bench`.
An entry module has `add_arguments(parser)`, which adds the command's arguments and its handler; it
reads the command's configs into typed settings and calls the library with values. The CLI imports
only the entry of the command it runs, so a stage runs (and DVC hashes) only its own code, and
`segpipe --help` imports no entry at all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Iterable, Sequence

# command -> (entry module, one-line help), in data-flow order
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("pipeline.stages.download", "fetch (or import) a dataset's archives, verified by sha256"),
    "manifest": (
        "pipeline.commands.manifest",
        "(maintainers) write a per-file manifest CSV from a verified copy of a dataset",
    ),
    "dataset": (
        "pipeline.commands.dataset",
        "add a dataset from folders, an nnU-Net raw folder or a MONAI datalist (writes its card)",
    ),
    "prepare": ("pipeline.stages.prepare", "validate, convert to NIfTI, split and compute weight maps"),
    "weightmap": (
        "pipeline.commands.weightmap",
        "U-Net eq. 2 weight map of a label image (NIfTI or TIFF) with a PNG preview",
    ),
    "train": ("pipeline.stages.train", "train a network on a prepared dataset (DVC stage train@DATASET-NETWORK)"),
    "evaluate": (
        "pipeline.stages.evaluate",
        "test-set metrics, curves and overlays of a trained network (DVC stage evaluate@...)",
    ),
    "report": ("pipeline.stages.report", "one table of every evaluated dataset x network (results/report.md)"),
    "infer": ("pipeline.stages.infer", "segment images of any size, streamed from disk to disk (sliding window)"),
    "export": (
        "pipeline.stages.export",
        "a checkpoint's inference graph as an ONNX model carrying its preprocessing and size contract",
    ),
    "bench": ("benchmarks.cli", "benchmarks side by side with MONAI and torch eager (not tests)"),
}

GROUPS = """\
stages and tools, in data-flow order:
  data           download, manifest, dataset add, dataset import
  preprocessing  prepare
  transforms     weightmap
  training       train
  evaluation     evaluate, report
  inference      infer, export
  bench          bench transforms | networks | infer | shards | train | quality
"""


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `commands` (default: all) are added by their entry modules,
    the other commands are listed with their help only."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="U-Net family segmentation pipeline (MONAI + PyTorch, DVC, MLflow).",
        epilog=GROUPS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of `argv` (the first argument that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; errors of input or setup print one line naming the file and exit 2."""
    from pipeline.errors import SegpipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except SegpipeError as exc:
        print(f"segpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
