"""`python -m mmflow.report <folder> [--out DIR]`: write the report of every done cell below `folder`.

A folder that does not exist is an error (exit 2); one with no cells gets an empty report and a note.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmflow.report", description=__doc__)
    parser.add_argument("folder", help="a sweep folder or results folder (searched recursively for cells)")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        print(f"[mmflow] error: report folder '{args.folder}' {what}", file=sys.stderr)
        return 2

    from mmflow.report import build_report
    from mmflow.storage.cell_data import find_cell_dirs

    if not find_cell_dirs(folder):
        print(f"[mmflow] no cells found below '{args.folder}': the report is empty", file=sys.stderr)
    index = build_report(folder, args.out)
    print(f"[mmflow] report: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
