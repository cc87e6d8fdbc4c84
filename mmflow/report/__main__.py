"""`python -m mmflow.report <folder> [--out DIR]`: write the report of every done cell below `folder`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmflow.report", description=__doc__)
    parser.add_argument("folder", help="a sweep folder or results folder (searched recursively for cells)")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    args = parser.parse_args(argv)

    from mmflow.report import build_report

    index = build_report(args.folder, args.out)
    print(f"[mmflow] report: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
