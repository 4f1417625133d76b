"""Markdown tables and PNGs from a results CSV (rows of gist_fast.bench_harness): what `gist-fast bench`
writes beside its CSV and what benchmarks/plot.py redraws for the README. The newest row of every
measurement counts (bench_harness.latest).

    bench.md, bench_throughput.png, bench_memory.png   op "train_step" (gist-fast bench)
    ops.md, ops_<op>.png                               the op micro-benchmarks (benchmarks/bench_ops.py)
    activation_memory.md                               op "saved_activations" (benchmarks/activation_memory.py)
    inference.md                                       op "inference" (benchmarks/inference.py: gist_fast.merge)

In every table, ms is the median (p50) with ± half the p20–p80 spread, relative to the median.
"""
import math
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from gist_fast.bench_harness import RESULTS_CSV, Row, append_rows, check_csv, latest, parse_config, read_rows

TRAIN_OP, ACTIVATIONS_OP, INFERENCE_OP = "train_step", "saved_activations", "inference"
OP_BASE, TRAIN_BASE = "gist_fast", "eager"  # what ratios are taken against
PER_IMPL = ("saved_MB_per_img", "max_batch")  # train_step metrics of an implementation, not of a batch size


def _num(v: Optional[float]) -> str:
    """Three significant digits below 100, integers above."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a == 0:
        return "0"
    return f"{v:.{max(0, 2 - math.floor(math.log10(a)))}f}"


def _x(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else _num(v)


def _ms(r: Optional[Row]) -> str:
    if r is None:
        return ""
    if r.p50 is None:
        return r.note or "–"
    if r.p20 is None or r.p80 is None or r.p50 == 0:
        return _num(r.p50)
    return f"{_num(r.p50)} ±{(r.p80 - r.p20) / 2 / r.p50:.0%}"


def _ratio(num: Optional[Row], den: Optional[Row]) -> str:
    if num is None or den is None or not num.p50 or not den.p50:
        return ""
    return f"{num.p50 / den.p50:.2f}×"


def _unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _short(model: str) -> str:
    return model.replace("_patch16_224", "")


def _split_config(rows: Sequence[Row]) -> Tuple[Dict[str, str], List[str]]:
    """(config items every row shares, config keys that vary), for a header line and table columns."""
    configs = [r.cfg for r in rows]
    keys = _unique(k for c in configs for k in c)
    constant = {k: configs[0][k] for k in keys if all(c.get(k) == configs[0].get(k) for c in configs)}
    return constant, [k for k in keys if k not in constant]


def _span(values: Sequence[float]) -> str:
    return f"{values[0]:g}" if values[0] == values[-1] else f"{values[0]:g} to {values[-1]:g}"


def _environment_lines(rows: Sequence[Row]) -> List[str]:
    """One line per (device, versions, commit) the rows come from, with their dates."""
    lines = []
    for env in _unique((r.device, r.torch, r.triton, r.timm, r.sha) for r in rows):
        dates = sorted({r.date for r in rows if (r.device, r.torch, r.triton, r.timm, r.sha) == env})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"- {env[0]}; torch {env[1]}, triton {env[2]}, timm {env[3]}; git {env[4]}; {when}")
    methods = _unique(r.method.split(",")[0] for r in rows if r.metric == "ms" and r.method)
    if methods:
        lines.append(f"- timing: {', '.join(methods)}, after untimed warm-up calls" + _load_note(rows))
    return lines


def _load_note(rows: Sequence[Row]) -> str:
    """The CPU load while timing, and whether other processes shared the machine (load beyond the
    benchmark's own threads)."""
    loads = sorted(float(m.group(1)) for m in (re.search(r", load ([0-9.]+)", r.method) for r in rows) if m)
    if not loads:
        return ""
    threads = [int(m.group(1)) for m in (re.search(r"(\d+) threads?$", r.device) for r in rows) if m]
    shared = threads and loads[-1] > max(threads) + 0.5
    return (f"; 1-minute load average while timing {_span(loads)}"
            + (": other processes shared the cores, so compare within a table (providers are timed "
               "interleaved), not across runs" if shared else ""))


def _table(header: Sequence[str], body: Iterable[Sequence[str]], numeric_from: int) -> List[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(b) + " |"
                                                                            for b in body]


# --- end to end (gist-fast bench) ---------------------------------------------------------------------

class _Cells:
    """Rows of one op indexed by (config, provider, x) -> metric -> row; per-implementation metrics by
    (config, provider)."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = rows
        self.by_x: Dict[Tuple, Dict[str, Row]] = {}
        self.by_impl: Dict[Tuple, Dict[str, Row]] = {}
        for r in rows:
            if r.metric in PER_IMPL:
                self.by_impl.setdefault((r.config, r.provider), {})[r.metric] = r
            else:
                self.by_x.setdefault((r.config, r.provider, r.x_value), {})[r.metric] = r

    def get(self, config: str, provider: str, x: float, metric: str) -> Optional[Row]:
        if metric in PER_IMPL:
            return self.by_impl.get((config, provider), {}).get(metric)
        return self.by_x.get((config, provider, x), {}).get(metric)

    def keys(self) -> List[Tuple[str, float, str]]:
        """(config, x, provider) of the timed cells, by config, then x, then provider as they ran."""
        configs, providers = _unique(k[0] for k in self.by_x), _unique(k[1] for k in self.by_x)
        cells = [k for k in self.by_x if "ms" in self.by_x[k]]
        return sorted(((c, x, p) for c, p, x in cells),
                      key=lambda k: (configs.index(k[0]), k[1], providers.index(k[2])))


def _max_batch_cell(row: Optional[Row]) -> str:
    if row is None:
        return ""
    if row.p50 is None:
        return row.note or row.method
    return f"{row.p50:.0f}" + (" (est)" if "estimate" in row.method else "")


def _train_line(cells: _Cells, key: Tuple[str, float, str], varying: List[str]) -> List[str]:
    config, x, impl = key
    cfg = parse_config(config)
    get = lambda metric, provider=impl: cells.get(config, provider, x, metric)  # noqa: E731
    mfu = get("mfu")
    labels = [_short(cfg.get(k, "")) if k == "model" else cfg.get(k, "") for k in varying]
    return (labels + [impl, f"{x:.0f}", _ms(get("ms")),
            _num(get("img_per_s").p50) if get("img_per_s") else "", _ratio(get("ms", TRAIN_BASE), get("ms")),
            _num(get("peak_MB").p50) if get("peak_MB") else "",
            _num(get("saved_MB_per_img").p50) if get("saved_MB_per_img") else "",
            f"{get('abs_dloss').p50:.1e}" if get("abs_dloss") else "",
            f"{mfu.p50:.1%}" if mfu and mfu.p50 is not None else "", _max_batch_cell(get("max_batch"))])


def _budget(rows: Sequence[Row]) -> str:
    budgets = _unique(r.x_value for r in rows if r.metric == "max_batch")
    return " / ".join(f"{b:g} GiB" for b in budgets) or "budget"


def _drop_empty(head: List[str], body: List[List[str]], keep: int) -> Tuple[List[str], List[List[str]]]:
    """Leave out the columns (after the first `keep`) that are empty in every line."""
    used = [i for i in range(len(head)) if i < keep or any(line[i] for line in body)]
    return [head[i] for i in used], [[line[i] for i in used] for line in body]


def train_markdown(rows: Sequence[Row]) -> str:
    """bench.md: a summary at each configuration's largest batch, then every (implementation, batch)."""
    rows = [r for r in rows if r.op == TRAIN_OP]
    if not rows:
        return ""
    cells = _Cells(rows)
    constant, varying = _split_config(rows)
    columns = ["model", *(k for k in varying if k != "model")]
    n = len(columns)
    head = [*columns, "impl", "batch", "step ms", "img/s", "vs eager", "peak MB", "saved MB/img", "|Δloss|", "MFU",
            f"max batch in {_budget(rows)}"]
    keys = cells.keys()
    body = [_train_line(cells, k, columns) for k in keys]
    measured = [(c, x) for c, x, p in keys if cells.get(c, p, x, "ms").p50 is not None]  # not skipped
    largest = {c: max(x for cc, x in measured if cc == c) for c, _ in measured}
    pick = [*range(n + 7), n + 8, n + 9]  # all but |Δloss|
    summary = [[line[i] for i in pick] for k, line in zip(keys, body) if k[1] == largest.get(k[0])]
    setting = ", ".join(f"{k}={v}" for k, v in constant.items() if k != "model")
    lines = [f"# gist-fast bench: a whole training step ({', '.join(_unique(r.device for r in rows))})", "",
             *_environment_lines(rows),
             f"- {setting + '; ' if setting else ''}step = forward + GistLoss + backward + AdamW; "
             "ms = median ± half the p20–p80 spread; vs eager = eager ms / ms; |Δloss| = |loss − eager's loss|",
             "", "## Summary: each model at its largest batch", "",
             *_table(*_drop_empty([head[i] for i in pick], summary, n + 2), n + 1),
             "", "## Every cell", "", *_table(*_drop_empty(head, body, n + 2), n + 1)]
    return "\n".join(lines) + "\n"


# --- op micro-benchmarks ------------------------------------------------------------------------------

def _op_row_cells(rows: Sequence[Row], providers: List[str], config: str, x: float, mode: str) -> List[str]:
    get = {r.provider: r for r in rows if (r.config, r.x_value, r.mode, r.metric) == (config, x, mode, "ms")}
    floor = get.get("floor")
    cells = []
    for p in providers:
        cell = _ms(get.get(p))
        if floor and get.get(p) is not None and get[p].p50:
            cell += f" ({floor.p50 / get[p].p50:.0%})"
        cells.append(cell)
    others = [p for p in providers if p not in (OP_BASE, "floor")]
    return cells + [_ratio(get.get(p), get.get(OP_BASE)) for p in others]


def _op_section(op: str, rows: Sequence[Row]) -> List[str]:
    timed = [r for r in rows if r.metric == "ms"]
    constant, varying = _split_config(timed)
    providers = _unique(r.provider for r in timed)
    providers = sorted(providers, key=lambda p: (p != OP_BASE, p == "floor"))
    others = [p for p in providers if p not in (OP_BASE, "floor")]
    x_name = timed[0].x_name
    floor_note = " (n%) = floor / time, the floor being the bytes the op must move / the copy bandwidth." \
        if "floor" in providers else ""
    lines = [f"## {op}", "", f"{', '.join(f'{k}={v}' for k, v in constant.items())}; ms per call.{floor_note}", ""]
    body = []
    for config in _unique(r.config for r in timed):
        cfg = parse_config(config)
        for x in sorted({r.x_value for r in timed if r.config == config}):
            for mode in _unique(r.mode for r in timed if r.config == config and r.x_value == x):
                body.append([cfg[k] for k in varying] + [_x(x), mode]
                            + _op_row_cells(timed, providers, config, x, mode))
    head = [*varying, x_name, "mode", *(f"{p} ms" for p in providers), *(f"{OP_BASE} vs {p}" for p in others)]
    lines += _table(head, body, len(varying) + 2)
    memory = [r for r in rows if r.metric == "peak_MB"]
    if memory:
        lines += ["", f"Peak MB allocated above the inputs, {memory[0].mode}:", ""]
        mem = {(r.config, r.x_value, r.provider): r for r in memory}
        keys = _unique((r.config, r.x_value) for r in memory)
        mem_providers = _unique(r.provider for r in memory)
        lines += _table([*varying, x_name, *mem_providers],
                        ([parse_config(c)[k] for k in varying] + [_x(x)]
                         + [_num(mem[(c, x, p)].p50) if (c, x, p) in mem else "" for p in mem_providers]
                         for c, x in keys), len(varying) + 1)
    return lines + [""]


def _op_summary(ops: Dict[str, List[Row]]) -> List[str]:
    """Full forward + backward at each configuration's largest x: gist_fast's ms and its ratios."""
    body, others = [], _unique(r.provider for rs in ops.values() for r in rs
                               if r.metric == "ms" and r.provider not in (OP_BASE, "floor"))
    for op, rows in ops.items():
        timed = [r for r in rows if r.metric == "ms" and r.mode == "full"]
        for config in _unique(r.config for r in timed):
            x = max(r.x_value for r in timed if r.config == config)
            get = {r.provider: r for r in timed if r.config == config and r.x_value == x}
            label = ", ".join(f"{k}={v}" for k, v in parse_config(config).items())
            body.append([op, label, f"{timed[0].x_name}={_x(x)}", _ms(get.get(OP_BASE))]
                        + [_ratio(get.get(p), get.get(OP_BASE)) for p in others])
    head = ["op", "config", "x", f"{OP_BASE} ms", *(f"vs {p}" for p in others)]
    return ["## Summary: forward + backward at the largest size", "",
            f"vs X = X ms / {OP_BASE} ms (> 1: {OP_BASE} is faster).", "", *_table(head, body, 3), ""]


def ops_markdown(rows: Sequence[Row]) -> str:
    ops: Dict[str, List[Row]] = {}
    for r in rows:
        if r.op not in (TRAIN_OP, ACTIVATIONS_OP, INFERENCE_OP):
            ops.setdefault(r.op, []).append(r)
    ops = {op: rs for op, rs in ops.items() if any(r.metric == "ms" for r in rs)}
    if not ops:
        return ""
    every = [r for rs in ops.values() for r in rs]
    lines = [f"# Op micro-benchmarks ({', '.join(_unique(r.device for r in every))})", "",
             *_environment_lines(every),
             f"- providers: {OP_BASE} = gist_fast.ops (C++ on CPU, Triton on CUDA), eager = gist_fast.reference, "
             "compile = torch.compile(reference), liger = Liger-Kernel's ops composed into the same loss; "
             "forward, backward (of one retained graph) and full (forward + backward); random non-zero data",
             *(f"- {v}" for v in _unique(r.note for r in every if r.provider == "liger" and r.p50 is not None)),
             "", *_op_summary(ops)]
    for op, op_rows in ops.items():
        lines += _op_section(op, op_rows)
    return "\n".join(lines)


# --- saved activations --------------------------------------------------------------------------------

def activations_markdown(rows: Sequence[Row]) -> str:
    rows = [r for r in rows if r.op == ACTIVATIONS_OP]
    if not rows:
        return ""
    configs = _unique(r.config for r in rows)
    value = {(r.config, r.provider): r.p50 for r in rows}
    head = ["variant"]
    for c in configs:
        label = ", ".join(f"{v}" for v in parse_config(c).values())
        head += [f"{label} MB/img", "% eager"]
    body = []
    for p in _unique(r.provider for r in rows):
        line = [p]
        for c in configs:
            v, ref = value.get((c, p)), value.get((c, "eager"))
            line += [_num(v), f"{100 * v / ref:.0f}%" if v is not None and ref else ""]
        body.append(line)
    return "\n".join([f"# Saved activations per image for backward ({rows[0].x_name} {_x(rows[0].x_value)})", "",
                      *_environment_lines(rows),
                      "- gist_fast.activation_bytes (saved-tensor hooks): device-independent, measured on CPU", "",
                      *_table(head, body, 1)]) + "\n"


# --- inference (benchmarks/inference.py) -----------------------------------------------------------------

def inference_markdown(rows: Sequence[Row]) -> str:
    """inference.md: per configuration and kind, timm's forward against the kind patched and merged."""
    rows = [r for r in rows if r.op == INFERENCE_OP]
    if not rows:
        return ""
    constant, varying = _split_config(rows)
    get = {(r.config, r.x_value, r.provider, r.metric): r for r in rows}
    body = []
    for config in _unique(r.config for r in rows):
        cfg = parse_config(config)
        for x in sorted({r.x_value for r in rows if r.config == config}):
            timm = get.get((config, x, "timm", "ms"))
            kinds = _unique(r.provider for r in rows if (r.config, r.x_value, r.metric) == (config, x, "ms")
                            and r.provider != "timm" and not r.provider.endswith("_merged"))
            for kind in kinds:
                unmerged, merged = get.get((config, x, kind, "ms")), get.get((config, x, f"{kind}_merged", "ms"))
                d = get.get((config, x, f"{kind}_merged", "max_abs_dlogits"))
                body.append([_short(cfg[k]) if k == "model" else cfg.get(k, "") for k in varying]
                            + [_x(x), kind, _ms(timm), _ms(unmerged), _ms(merged), _ratio(timm, unmerged),
                               _ratio(timm, merged), _ratio(unmerged, merged),
                               f"{d.p50:.1e}" if d is not None and d.p50 is not None else ""])
    head = [*varying, rows[0].x_name, "kind", "timm ms", "unmerged ms", "merged ms", "unmerged vs timm",
            "merged vs timm", "merged vs unmerged", "max abs Δlogits"]
    setting = ", ".join(f"{k}={v}" for k, v in constant.items())
    return "\n".join([f"# Inference: gist_fast.merge ({', '.join(_unique(r.device for r in rows))})", "",
                      *_environment_lines(rows),
                      f"- {setting + '; ' if setting else ''}eval-mode forward of one batch under no_grad: timm = the "
                      "unpatched model, unmerged = patch() (its defaults, random non-zero PEFT tensors), merged = "
                      "after gist_fast.merge; ms = median ± half the p20–p80 spread; X vs Y = Y ms / X ms "
                      "(1.00×: as fast); max abs Δlogits = max |merged − unmerged| logit on the batch", "",
                      *_table(head, body, len(varying) + 2)]) + "\n"


# --- plots --------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, points: List[Tuple[float, Row]], label: str, **style) -> None:
    """A line through the medians, with the p20–p80 band around it."""
    points = sorted(((x, r) for x, r in points if r.p50 is not None), key=lambda t: t[0])
    if not points:
        return
    xs = [x for x, _ in points]
    ax.plot(xs, [r.p50 for _, r in points], marker="o", markersize=3, label=label, **style)
    lo = [r.p20 if r.p20 is not None else r.p50 for _, r in points]
    hi = [r.p80 if r.p80 is not None else r.p50 for _, r in points]
    ax.fill_between(xs, lo, hi, alpha=0.2, color=ax.lines[-1].get_color())


def _axes(ax, rows: Sequence[Row], log_y: bool) -> None:
    """Log x with a plain label at every size measured; log y (if asked) with plain labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    xs = sorted({r.x_value for r in rows})
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs, [_x(x) for x in xs], fontsize=7)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", labelsize=7)


def _label(config: str) -> str:
    return ", ".join(_short(v) if k == "model" else f"{k}={v}" for k, v in parse_config(config).items())


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _title(rows: Sequence[Row]) -> str:
    return f"{', '.join(_unique(r.device for r in rows))}\ngit {', '.join(_unique(r.sha for r in rows))}"


def _train_plots(plt, rows: Sequence[Row], out: str) -> List[str]:
    configs = _unique(r.config for r in rows if r.metric == "img_per_s")
    if not configs:
        return []
    fig, axes = plt.subplots(1, len(configs), figsize=(max(7.0, 5.5 * len(configs)), 4.5), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for impl in _unique(r.provider for r in rows):
            pts = [(r.x_value, r) for r in rows if (r.config, r.provider, r.metric) == (config, impl, "img_per_s")]
            _band(ax, pts, impl)
        _axes(ax, [r for r in rows if r.config == config and r.metric == "img_per_s"], log_y=False)
        ax.set(title=_label(config), xlabel="batch", ylabel="images / s (p50, p20–p80 band)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"training step throughput: {_title(rows)}", fontsize=9)
    written = [_save(fig, os.path.join(out, "bench_throughput.png"))]
    metrics = [m for m in ("saved_MB_per_img", "peak_MB") if any(r.metric == m for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(configs), figsize=(max(7.0, 5.5 * len(configs)), 3.8 * len(metrics)),
                             squeeze=False)
    for row_axes, metric in zip(axes, metrics):
        for ax, config in zip(row_axes, configs):
            sel = [r for r in rows if (r.config, r.metric) == (config, metric) and r.p50 is not None]
            if metric == "peak_MB" and sel:
                sel = [r for r in sel if r.x_value == max(s.x_value for s in sel)]
            ax.bar([r.provider for r in sel], [r.p50 for r in sel], color="tab:blue")
            where = f" at batch {sel[0].x_value:.0f}" if metric == "peak_MB" and sel else ""
            ax.set(title=_label(config),
                   ylabel={"saved_MB_per_img": "saved activations, MB / image", "peak_MB": "peak MB"}[metric] + where)
            ax.tick_params(axis="x", rotation=35, labelsize=7)
    fig.suptitle(f"memory of a training step: {_title(rows)}", fontsize=9)
    return written + [_save(fig, os.path.join(out, "bench_memory.png"))]


def _op_plot(plt, op: str, rows: Sequence[Row], out: str) -> str:
    timed = [r for r in rows if r.metric == "ms"]
    configs, modes = _unique(r.config for r in timed), _unique(r.mode for r in timed)
    fig, axes = plt.subplots(len(configs), len(modes), figsize=(4.2 * len(modes), 3.2 * len(configs)),
                             squeeze=False)
    colors = {p: f"C{i}" for i, p in enumerate(_unique(r.provider for r in timed))}
    for ax_row, config in zip(axes, configs):
        for ax, mode in zip(ax_row, modes):
            for p in colors:
                pts = [(r.x_value, r) for r in timed if (r.config, r.mode, r.provider) == (config, mode, p)]
                _band(ax, pts, p, color=colors[p],
                      linestyle="--" if p == "floor" else "-")
            _axes(ax, [r for r in timed if r.config == config], log_y=True)
            ax.set(title=f"{_label(config)}: {mode}",
                   xlabel=timed[0].x_name, ylabel="ms")
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{op}: {_title(timed)}", fontsize=9)
    return _save(fig, os.path.join(out, f"ops_{op}.png"))


# --- everything ---------------------------------------------------------------------------------------

def _write_text(path: str, text: str) -> str:
    """Through a temporary file, so a run killed mid-write leaves the previous whole file."""
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
    return path


def results_sink(out: str) -> Tuple[str, Callable[[List[Row]], List[str]]]:
    """(out/results.csv, emit): the folder made, an existing CSV checked for the schema; emit(rows) appends
    them and redraws the markdown (so a run stopped part-way keeps its tables), returning what it wrote."""
    path = os.path.join(out, RESULTS_CSV)
    os.makedirs(out, exist_ok=True)
    check_csv(path)

    def emit(rows: List[Row]) -> List[str]:
        append_rows(path, rows)
        return write_reports(out, plots=False)

    return path, emit


def write_reports(folder: str, plots: bool = True) -> List[str]:
    """Every report the rows of folder/results.csv make, written into folder; the paths written.
    Without matplotlib the PNGs are left out (with a line saying so)."""
    rows = latest(read_rows(os.path.join(folder, RESULTS_CSV)))
    written = []
    for name, render in (("bench.md", train_markdown), ("ops.md", ops_markdown),
                         ("activation_memory.md", activations_markdown), ("inference.md", inference_markdown)):
        text = render(rows)
        if text:
            written.append(_write_text(os.path.join(folder, name), text))
    if not plots:
        return written
    plt = _pyplot()
    if plt is None:
        print("matplotlib is not installed: no PNGs (pip install matplotlib)")
        return written
    written += _train_plots(plt, [r for r in rows if r.op == TRAIN_OP], folder)
    for op in _unique(r.op for r in rows if r.op not in (TRAIN_OP, ACTIVATIONS_OP, INFERENCE_OP) and r.metric == "ms"):
        written.append(_op_plot(plt, op, [r for r in rows if r.op == op], folder))
    return written
