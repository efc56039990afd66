"""`vlmtune report RUN [RUN ...] [--out FILE]`: the run report, one self-contained HTML file (vlmtune.report)."""

from __future__ import annotations

import argparse
import sys

from vlmtune.report.page import write_report
from vlmtune.report.runs import NotARunFolder
from vlmtune.tracking import echo

NOT_A_RUN_EXIT = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders (train.output_dir); several are compared on the same charts")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html for one run; needed for several)")


def command(args: argparse.Namespace) -> int:
    """``vlmtune report RUN [RUN ...] [--out FILE]``."""
    if len(args.runs) > 1 and not args.out:
        print("error: several runs: say where the report goes (--out FILE)", file=sys.stderr)
        return NOT_A_RUN_EXIT
    try:
        path = write_report(args.runs, args.out)
    except NotARunFolder as e:
        print(f"error: {e}", file=sys.stderr)
        return NOT_A_RUN_EXIT
    echo(f"wrote {path}")
    return 0
