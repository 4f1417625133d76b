"""The one plotting script: markdown tables and PNGs from a device's results CSV
(gist_fast.bench_report), the ones the README shows.

    python benchmarks/plot.py                                  every benchmarks/results/<device>/
    python benchmarks/plot.py benchmarks/results/cpu           one folder
    python benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3 --add /path/from/gpu/results.csv
    python benchmarks/plot.py benchmarks/results/cpu --prune   keep only the newest row of each measurement

Reads FOLDER/results.csv (the rows of gist-fast bench, benchmarks/bench_ops.py and
benchmarks/activation_memory.py); the newest row of each measurement counts. Writes bench.md,
bench_throughput.png, bench_memory.png, ops.md, ops_<op>.png and activation_memory.md, each where
the CSV holds its rows. --add appends another CSV of the same schema first (what a GPU run sent
back); --prune rewrites the CSV without the rows newer ones replaced.
"""
import glob
import os
import sys
from typing import List, Optional

from gist_fast import bench_harness as harness
from gist_fast.bench_report import write_reports

HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(argv: Optional[List[str]]):
    p = harness.Parser(prog="plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="results folders (default: every benchmarks/results/*/ with a CSV)")
    p.add_argument("--add", action="append", default=[], metavar="CSV",
                   help="append this CSV's rows to the folder's results.csv first (one folder only)")
    p.add_argument("--prune", action="store_true", help="drop the rows that newer ones replaced")
    p.add_argument("--no-plots", action="store_true", help="markdown only")
    return p.parse_args(argv)


def _prune(path: str) -> int:
    rows = harness.read_rows(path)
    kept = harness.latest(rows)
    if os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")
    harness.append_rows(path + ".tmp", kept)
    os.replace(path + ".tmp", path)
    return len(rows) - len(kept)


def main(argv: Optional[List[str]] = None) -> int:
    return harness.run_cli("plot.py", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    args = _parse(argv)
    folders = args.folders or sorted(os.path.dirname(p) for p in
                                     glob.glob(os.path.join(HERE, "results", "*", harness.RESULTS_CSV)))
    if args.add and len(folders) != 1:
        raise ValueError("--add needs exactly one results folder")
    for folder in folders:
        path = os.path.join(folder, harness.RESULTS_CSV)
        for extra in args.add:
            if not os.path.isfile(extra):
                raise ValueError(f"--add {extra}: no such file")
            harness.append_rows(path, harness.read_rows(extra))
        if not os.path.exists(path):
            raise ValueError(f"{path}: no results CSV")
        if args.prune:
            print(f"{path}: {_prune(path)} rows replaced by newer ones dropped")
        for written in write_reports(folder, plots=not args.no_plots):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
