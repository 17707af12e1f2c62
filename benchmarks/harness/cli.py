"""The command line every benchmark module's ``main`` shares."""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import List, Optional, Sequence

from . import results
from .device import DEVICE, device_name
from .machine import start_run
from .results import UPDATE_ENV, render_markdown, write_results

__all__ = ["base_parser", "parse_main_args", "finish_main"]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: per module)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: per module)")
    p.add_argument("--out-dir", type=pathlib.Path, default=None,
                   help=f"where <device>.json/.md go (default {results.LOCAL_RESULTS_DIR}, untracked; "
                        f"{results.RESULTS_DIR} with --update-results or {UPDATE_ENV}=1)")
    p.add_argument("--update-results", action="store_true",
                   help=f"rewrite the committed results in {results.RESULTS_DIR}")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    p.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    return p


def parse_main_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse a benchmark ``main``'s arguments and mark the start of the run (:func:`start_run`)."""
    args = parser.parse_args(argv)
    start_run()
    return args


def finish_main(args, section_names: Sequence[str], errors: List[str]) -> int:
    """Print the tables, write the files, and return the exit status."""
    secs = [results.RESULTS[n] for n in section_names if n in results.RESULTS]
    data = {"device": {"name": device_name(), "kind": DEVICE.type},
            "sections": {s.name: s.to_json() for s in secs if s.rows}}
    print(render_markdown(data))
    if not args.no_write:
        out_dir = args.out_dir
        if out_dir is None and getattr(args, "update_results", False):
            out_dir = results.RESULTS_DIR
        j, m = write_results(secs, out_dir)
        print(f"results written to {j} and {m}")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0
