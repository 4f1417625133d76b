"""The one benchmark harness: timing, environment and result rows, shared by `gist-fast bench` (a whole
training step) and the op micro-benchmarks (benchmarks/bench_ops.py).

Timing. Every function is first called `warmup` times, untimed (compilation, autotuning and allocator
growth are never timed). On CUDA, triton.testing.do_bench (CUDA events, L2 flushed before each call);
on CPU, time.perf_counter around each call, the functions compared interleaved round by round (a
shared CPU's load drifts; each round times every function once). Both report the 0.5, 0.2 and 0.8
quantiles in ms, and `method` says how (with the 1-minute load average on CPU).

Rows. One schema (COLUMNS) for every result: what was run (op, provider, mode, metric, x_name,
x_value, config), the value (p50, p20, p80; p50 alone for what is not a distribution), how (method),
what went wrong or was left out (note), and where (device, torch, triton, timm, sha, date).
append_rows() adds rows to a CSV (one per device: benchmarks/results/<device>/results.csv);
read_rows() and latest() read them back, the last row of each KEY winning, so a CSV is a history and
its reports (gist_fast.bench_report) show the newest measurement of everything.
"""
import argparse
import csv
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

KEY = ("op", "provider", "mode", "metric", "x_name", "x_value", "config", "device")  # one measurement
RESULTS_CSV = "results.csv"
QUANTILES = (0.5, 0.2, 0.8)


@dataclasses.dataclass
class Row:
    """One result: a measured distribution (p50, p20, p80) or a single value (p50), or an empty p50
    with a note (skipped, error)."""

    op: str
    provider: str
    mode: str  # forward | backward | full (an op's forward + backward) | step (a training step)
    metric: str  # ms, img_per_s, peak_MB, saved_MB_per_img, max_batch, abs_dloss, mfu, ...
    x_name: str
    x_value: float
    config: str = ""  # key=value;key=value (config_str)
    p50: Optional[float] = None
    p20: Optional[float] = None
    p80: Optional[float] = None
    method: str = ""
    note: str = ""
    device: str = ""
    torch: str = ""
    triton: str = ""
    timm: str = ""
    sha: str = ""
    date: str = ""

    def key(self) -> Tuple:
        return tuple(getattr(self, k) for k in KEY)

    @property
    def cfg(self) -> Dict[str, str]:
        return parse_config(self.config)


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))  # the CSV header, in this order


def make_row(env: Mapping[str, str], op: str, provider: str, mode: str, metric: str, x_name: str, x_value: float,
             config: Mapping[str, object], value=None, method: str = "", note: str = "") -> Row:
    """A row in environment `env` (environment()); value: a Timing, a (p50, p20, p80) triple, a number or None."""
    if isinstance(value, Timing):
        method = method or value.method
        value = (value.p50, value.p20, value.p80)
    p50, p20, p80 = value if isinstance(value, tuple) else (value, None, None)
    return Row(op, provider, mode, metric, x_name, float(x_value), config_str(config),
               *(None if v is None else float(v) for v in (p50, p20, p80)), method, note,
               **{k: env[k] for k in ("device", "torch", "triton", "timm", "sha", "date")})


def config_str(config: Mapping[str, object]) -> str:
    for k, v in config.items():
        if re.search(r"[;=\n]", f"{k}{v}"):
            raise ValueError(f"config {k}={v}: keys and values may not hold ';', '=' or newlines")
    return ";".join(f"{k}={v}" for k, v in config.items())


def parse_config(text: str) -> Dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if part)


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else format(v, ".8g")


def check_csv(path: str) -> None:
    """ValueError unless `path` is absent, empty or a results CSV with this schema's header."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path} is not a results CSV of this schema (header {','.join(header)[:80]}...; "
                         f"expected {','.join(COLUMNS)})")


def append_rows(path: str, rows: Iterable[Row]) -> None:
    """Append rows to the CSV at `path`, writing the header into a new or empty file."""
    check_csv(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([_fmt(v) if isinstance(v, float) or v is None else v
                             for v in dataclasses.astuple(r)])


def read_rows(path: str) -> List[Row]:
    check_csv(path)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    numeric = ("x_value", "p50", "p20", "p80")
    return [Row(**{k: (float(r[k]) if r[k] != "" else None) if k in numeric else r[k] for k in COLUMNS})
            for r in rows]


def latest(rows: Iterable[Row]) -> List[Row]:
    """The last row of each KEY, in the order each key first appeared."""
    last: Dict[Tuple, Row] = {}
    for r in rows:
        last[r.key()] = r
    return list(last.values())


# --- environment ---------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu: {_cpu_model()} ({os.cpu_count()} cores), {threads} thread{'' if threads == 1 else 's'}"


def device_slug(device: torch.device) -> str:
    """The results folder of a device: benchmarks/results/<slug> (cpu, nvidia-h100-80gb-hbm3, ...)."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


def results_dir(device: torch.device) -> str:
    return os.path.join("benchmarks", "results", device_slug(device))


def git_sha() -> str:
    """GIT_SHA from the environment (where the checkout travels without .git), else HEAD (+ -dirty)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "") if sha else "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "none"


def environment(device: torch.device) -> Dict[str, str]:
    """The columns every row carries: device, torch, triton, timm, sha, date."""
    return {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --- timing --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    p50: float  # ms
    p20: float
    p80: float
    method: str

    def per_second(self, count: float) -> Tuple[float, float, float]:
        """(p50, p20, p80) of count / time: a throughput's quantiles are the times' inverted."""
        return tuple(count * 1e3 / t for t in (self.p50, self.p80, self.p20))


class Deadline:
    """A wall-clock budget (None: no limit)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def allows(self, seconds: float = 0.0) -> bool:
        """Whether work expected to take `seconds` would end inside the budget."""
        return self.end is None or time.monotonic() + seconds < self.end


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_ms: Sequence[float]) -> Tuple[float, float, float]:
    """The 0.5, 0.2 and 0.8 quantiles (linear interpolation, as do_bench's)."""
    q = torch.quantile(torch.tensor(list(times_ms), dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


def _clear(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _warm(fn: Callable, device: torch.device, warmup: int, grads: Sequence[torch.Tensor]) -> float:
    """Call fn `warmup` times (at least once); an estimate of one call in ms: the fastest call after the
    first (which may compile), robust to a call that a busy machine delayed."""
    times = []
    for _ in range(max(1, warmup)):
        _clear(grads)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return max(min(times[1:] or times), 1e-3)


def _do_bench(fn: Callable, estimate_ms: float, reps: Optional[int], rep_ms: float,
              grads: Sequence[torch.Tensor]) -> Timing:
    from triton.testing import do_bench

    window = (reps + 0.5) * estimate_ms if reps else rep_ms  # do_bench repeats int(window / its estimate) times
    p50, p20, p80 = do_bench(fn, warmup=0, rep=window, grad_to_none=list(grads) or None, quantiles=list(QUANTILES))
    how = f"~{reps} calls" if reps else f"rep {rep_ms:g} ms"
    return Timing(p50, p20, p80, f"triton do_bench, {how}")


def _load() -> str:
    try:
        return f", load {os.getloadavg()[0]:.1f}"
    except OSError:
        return ""


def _interleaved(fns: Mapping[str, Callable], estimates: Mapping[str, float], reps: Optional[int], rep_ms: float,
                 grads: Mapping[str, Sequence[torch.Tensor]], min_reps: int, max_reps: int) -> Dict[str, Timing]:
    if not reps:
        per_round = sum(estimates.values()) / len(estimates)
        reps = int(min(max(rep_ms / per_round, min_reps), max_reps))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _clear(grads.get(name, ()))
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    shared = f" interleaved with {len(fns) - 1} other(s)" if len(fns) > 1 else ""
    how = f"perf_counter, {reps} calls{shared}{_load()}"
    return {name: Timing(*quantiles(t), how) for name, t in times.items()}


def measure(fns: Mapping[str, Callable], device: torch.device, warmup: int = 3, reps: Optional[int] = None,
            rep_ms: float = 100.0, grad_to_none: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
            min_reps: int = 10, max_reps: int = 1000) -> Dict[str, Timing]:
    """Time each function (called with no arguments) after `warmup` untimed calls: `reps` calls, or as
    many as fill about `rep_ms` per function (CPU: at least min_reps, at most max_reps). grad_to_none:
    per function, the tensors whose .grad is cleared before each call, untimed."""
    grads = dict(grad_to_none or {})
    estimates = {name: _warm(fn, device, warmup, grads.get(name, ())) for name, fn in fns.items()}
    if device.type == "cuda":
        return {name: _do_bench(fn, estimates[name], reps, rep_ms, grads.get(name, ())) for name, fn in fns.items()}
    return _interleaved(fns, estimates, reps, rep_ms, grads, min_reps, max_reps)


def peak_memory_mb(fn: Callable, device: torch.device) -> Optional[Tuple[float, float]]:
    """(peak, before) MB allocated by the CUDA caching allocator over one call of fn; None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, before / 2**20


# --- command lines -------------------------------------------------------------------------------------

class CliExit(Exception):
    """--help and friends: the command line returns `status` instead of exiting the interpreter."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse that raises: ValueError (one line) on a bad option, CliExit after --help."""

    def error(self, message: str):
        raise ValueError(message)

    def exit(self, status: int = 0, message: Optional[str] = None):
        if message:
            print(message, end="")
        raise CliExit(status)


def positive_ints(text: str, option: str) -> List[int]:
    """'8,32' -> [8, 32]; anything but a comma list of integers >= 1 is a one-line error naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option} {text}: expected a comma list of integers, each {option} >= 1")
    return values


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit code; --help's 0; 2 with one line on stderr for a bad option or an unusable path; 130 on
    Ctrl-C."""
    try:
        return body()
    except CliExit as e:
        return e.status
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every row measured so far is already in the CSV
        print(f"{prog}: interrupted; the rows measured so far are in the results CSV", file=sys.stderr)
        return 130


def device(name: Optional[str]) -> torch.device:
    """--device, checked: cpu, or cuda[:N] for a GPU this machine has (default: cuda when available)."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    numbered = not index or index.isdigit()
    if not numbered or not (kind == "cpu" or (kind == "cuda" and (int(index or 0) < gpus))):
        raise ValueError(f"--device {name}: expected cpu, or cuda on a machine with a GPU")
    return torch.device(name)
