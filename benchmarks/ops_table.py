"""Markdown table of a pytest-benchmark JSON from bench_cpu_ops.py: per group (one shape), the median
of each implementation and the speed-up of the C++ op over eager and over torch.compile.

    .venv/bin/python benchmarks/ops_table.py benchmarks/results/cpu/ops.json > benchmarks/results/cpu/ops.md
"""
import json
import sys
from collections import defaultdict


def table(report: dict) -> str:
    medians = defaultdict(dict)  # group -> impl -> median seconds
    for bench in report["benchmarks"]:
        medians[bench["group"]][bench["params"]["impl"]] = bench["stats"]["median"]
    info = report["machine_info"]
    lines = [
        f"# C++ CPU ops: forward + backward ({info.get('cpu', {}).get('brand_raw', info['processor'])}, "
        f"{report['datetime'][:16]} UTC, commit {report.get('commit_info', {}).get('id', '?')[:7]})",
        "",
        "Median ms per forward+backward (pytest-benchmark); ratios = other / cpp, > 1 means the C++ op is faster.",
        "",
        "| case | cpp ms | eager ms | compile ms | vs eager | vs compile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group, by_impl in medians.items():
        cpp, eager, compiled = (by_impl.get(k) for k in ("cpp", "reference", "compiled"))
        ms = lambda t: f"{t * 1e3:.2f}" if t else ""  # noqa: E731
        ratio = lambda t: f"{t / cpp:.2f}×" if t and cpp else ""  # noqa: E731
        lines.append(f"| {group} | {ms(cpp)} | {ms(eager)} | {ms(compiled)} | {ratio(eager)} | {ratio(compiled)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(table(json.load(f)))
