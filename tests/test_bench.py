"""The benchmark harness (timing, rows, the CSV), the reports drawn from it, `gist-fast bench` end to end
and the op benchmarks' setups, on tiny models and shapes."""
import csv
import importlib.util
import inspect
import os
import re

import pytest
import torch

import gist_fast
from gist_fast import bench, bench_report
from gist_fast import bench_harness as harness

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--models", "vit_tiny", "--batches", "2", "--steps", "2", "--warmup", "0", "--img-size", "32",
        "--device", "cpu"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = {"device": "cpu: test, 2 threads", "torch": "2.x", "triton": "3.x", "timm": "1.x", "sha": "abc1234",
       "date": "2026-01-01 00:00 UTC"}


def _row(op="adapter", provider="gist_fast", mode="full", metric="ms", x=64, config=None, value=(1.0, 0.9, 1.2),
         **kw):
    return harness.make_row(ENV, op, provider, mode, metric, "rows", x, config or {"D": 8, "dtype": "fp32"}, value,
                            **kw)


# --- the harness ---------------------------------------------------------------------------------------

def test_rows_round_trip_through_the_csv(tmp_path):
    path = str(tmp_path / "results.csv")
    timing = harness.Timing(2.0, 1.5, 3.25, "perf_counter, 10 calls")
    rows = [_row(value=timing), _row(provider="eager", value=None, note="skipped: time budget"),
            _row(metric="max_batch", value=123, method="estimate, with a comma"),
            harness.make_row({**ENV, "device": 'cpu: "quoted", 2 threads'}, "x", "p", "step", "mfu", "batch", 2.5, {},
                             0.125)]
    harness.append_rows(path, rows[:2])
    harness.append_rows(path, rows[2:])  # appending keeps one header
    with open(path, newline="") as fh:
        lines = list(csv.reader(fh))
    assert tuple(lines[0]) == harness.COLUMNS and len(lines) == 5
    assert tuple(harness.COLUMNS[:10]) == ("op", "provider", "mode", "metric", "x_name", "x_value", "config", "p50",
                                           "p20", "p80")
    back = harness.read_rows(path)
    assert back == rows
    assert back[0].method == "perf_counter, 10 calls" and back[0].cfg == {"D": "8", "dtype": "fp32"}
    assert back[1].p50 is None and back[1].note == "skipped: time budget"
    assert lines[3][harness.COLUMNS.index("p50")] == "123"  # integers stay integers in the file


def test_a_csv_of_another_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("kernel_name,y_value_50\nx,1\n")
    with pytest.raises(ValueError, match="not a results CSV") as e:
        harness.append_rows(str(path), [_row()])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="may not hold"):
        harness.config_str({"a": "b;c"})


def test_latest_keeps_the_newest_row_of_each_measurement():
    old, other, new = _row(value=5.0), _row(x=128, value=6.0), _row(value=7.0)
    assert harness.latest([old, other, new]) == [new, other]


def test_quantiles_are_do_bench_s():
    assert harness.quantiles([5, 1, 4, 2, 3]) == pytest.approx((3.0, 1.8, 4.2))


def test_measure_warms_up_untimed_interleaves_and_clears_gradients():
    calls = {"a": 0, "b": 0}
    order = []
    leaf = torch.ones(2, requires_grad=True)

    def fn(name):
        def call():
            assert leaf.grad is None  # cleared before every call
            calls[name] += 1
            order.append(name)
            leaf.sum().backward()
        return call

    timings = harness.measure({"a": fn("a"), "b": fn("b")}, torch.device("cpu"), warmup=2, reps=5,
                              grad_to_none={"a": [leaf], "b": [leaf]})
    assert calls == {"a": 7, "b": 7}
    assert order[4:] == ["a", "b"] * 5  # after the warm-up, each round times both once
    for t in timings.values():
        assert 0 < t.p20 <= t.p50 <= t.p80 and "5 calls interleaved" in t.method and "load" in t.method
    assert harness.Timing(2.0, 1.0, 4.0, "").per_second(8) == (4000.0, 2000.0, 8000.0)
    assert harness.peak_memory_mb(lambda: None, torch.device("cpu")) is None


def test_environment_and_git_sha_from_the_environment(monkeypatch):
    monkeypatch.setenv("GIT_SHA", "abc1234")
    env = harness.environment(torch.device("cpu"))
    assert env["sha"] == "abc1234" and env["torch"] == torch.__version__
    assert set(env) == {"device", "torch", "triton", "timm", "sha", "date"} and "threads" in env["device"]
    assert harness.device_slug(torch.device("cpu")) == "cpu"


# --- gist-fast bench -----------------------------------------------------------------------------------

def test_bench_cpu_appends_rows_and_draws_reports(tmp_path):
    out = tmp_path / "results"
    args = [*TINY, "--impls", "eager,checkpoint,gist_fast", "--out", str(out)]
    assert bench.main(args) == 0
    rows = harness.read_rows(str(out / "results.csv"))
    assert {r.op for r in rows} == {"train_step"} and {r.sha for r in rows} == {harness.git_sha()}
    get = {(r.provider, r.metric): r for r in rows}
    assert {p for p, _ in get} == {"eager", "checkpoint", "gist_fast"}
    assert get["gist_fast", "abs_dloss"].p50 < 1e-4
    assert get["gist_fast", "saved_MB_per_img"].p50 < get["eager", "saved_MB_per_img"].p50
    ms = get["eager", "ms"]
    assert ms.p20 <= ms.p50 <= ms.p80 and ms.x_name == "batch" and ms.x_value == 2 and ms.mode == "step"
    assert ms.cfg == {"model": "vit_tiny_patch16_224", "peft": "adapter", "dtype": "fp32", "img": "32",
                      "classes": "100"}
    assert get["eager", "img_per_s"].p50 == pytest.approx(2e3 / ms.p50)
    assert get["eager", "max_batch"].p50 > 0 and "estimate" in get["eager", "max_batch"].method
    md = (out / "bench.md").read_text()
    assert "| vit_tiny | gist_fast | 2 |" in md and "git " + harness.git_sha() in md
    for png in ("bench_throughput.png", "bench_memory.png"):
        assert (out / png).stat().st_size > 1000
    assert bench.main([*TINY, "--impls", "eager", "--out", str(out), "--no-plots"]) == 0  # a second run appends
    again = harness.read_rows(str(out / "results.csv"))
    assert len(again) > len(rows) and again[:len(rows)] == rows


def test_bench_runs_each_peft_kind_with_its_own_eager_baseline(tmp_path):
    """--peft: a row set per kind (the Gist token and GistLoss in each), vs that kind's own eager and compile."""
    out = tmp_path / "results"
    argv = [*TINY, "--peft", "lora,ssf", "--impls", "eager,gist_fast_min", "--out", str(out), "--no-plots"]
    assert bench.main(argv) == 0
    rows = harness.read_rows(str(out / "results.csv"))
    saved = {(r.cfg["peft"], r.provider): r.p50 for r in rows if r.metric == "saved_MB_per_img"}
    assert set(saved) == {(k, i) for k in ("lora", "ssf") for i in ("eager", "gist_fast_min")}
    assert all(saved[k, "gist_fast_min"] < saved[k, "eager"] / 4 for k in ("lora", "ssf"))
    assert all(r.p50 < 1e-4 for r in rows if r.metric == "abs_dloss")
    assert "| vit_tiny | lora | gist_fast_min | 2 |" in (out / "bench.md").read_text()


def test_time_budget_skips_later_cells_and_publishes_after_each(monkeypatch):
    allows = iter([True] + [False] * 20)  # the budget runs out after the first cell
    monkeypatch.setattr(bench.Deadline, "allows", lambda self, seconds=0.0: next(allows))
    published = []
    s = bench.settings(bench._parse(["--models", "vit_tiny", "--impls", "gist_fast,eager", "--batches", "2,3",
                                     "--steps", "1", "--warmup", "0", "--img-size", "32", "--device", "cpu",
                                     "--memory-budget", "none"]))
    rows = bench.run(s, on_rows=lambda new: published.append({(r.provider, r.x_value, r.metric) for r in new}))
    assert published[0] == {("eager", 4, "saved_MB_per_img"), ("gist_fast", 4, "saved_MB_per_img")}
    assert ("gist_fast", 2, "ms") in published[1] and ("eager", 2, "abs_dloss") in published[1]
    assert published[2] == {("eager", 3, "ms"), ("gist_fast", 3, "ms")} and len(published) == 3
    skipped = [r for r in rows if r.note]
    assert [(r.provider, r.x_value, r.p50, r.note) for r in skipped] == [
        ("eager", 3, None, "skipped: time budget"), ("gist_fast", 3, None, "skipped: time budget")]
    assert "| vit_tiny | gist_fast | 3 | skipped: time budget |" in bench_report.train_markdown(rows)


def test_step_gflops_vit_base_about_70():
    import timm

    assert 65 < bench.step_gflops(timm.create_model("vit_base_patch16_224", pretrained=False)) < 75


def test_default_patch_impl_and_the_inductor_flag_scoped_to_compiled_calls():
    import torch._inductor.config as inductor

    assert bench.MEMORY["gist_fast_auto"] == inspect.signature(gist_fast.patch).parameters["memory"].default
    model = torch.nn.Linear(2, 2)
    compiled, eager = (bench.Runner(impl, model, torch.device("cpu"), None) for impl in ("eager_compile", "eager"))
    assert inductor.fallback_random is False
    with compiled.scope():
        assert inductor.fallback_random is True
    with eager.scope():
        assert inductor.fallback_random is False
    assert inductor.fallback_random is False


def test_bad_options_are_one_line_and_memory_selects_impls(tmp_path, capsys):
    for argv, expected in ((["--models", "resnet18"], "--models resnet18"), (["--batches", "0"], "--batches >= 1"),
                           (["--batches", "2,x"], "--batches 2,x"), (["--device", "gpu"], "--device gpu"),
                           (["--memory", "some"], "--memory some"), (["--impls", "fast"], "--impls fast"),
                           (["--dtype", "fp16"], "--dtype"), (["--steps", "many"], "--steps"),
                           (["--threads", "0"], "--threads 0"), (["--peft", "ln"], "--peft ln"),
                           (["--nope"], "--nope")):
        assert bench.main([*argv, "--no-plots", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and err.startswith("gist-fast bench: error:"), err
    (tmp_path / "results.csv").write_text("a,b\n")
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 2
    assert "not a results CSV" in capsys.readouterr().err
    assert bench.main(["--help"]) == 0 and "--memory-budget" in capsys.readouterr().out
    assert bench.select_impls(None, "lean,none") == ["eager", "checkpoint", "gist_fast", "gist_fast_ops",
                                                     "eager_compile", "gist_fast_compile"]
    assert bench.select_impls("eager,gist_fast_min,gist_fast_auto", "min") == ["eager", "gist_fast_min"]
    assert bench.select_impls(None, None) == list(bench.IMPLS)


# --- the reports and the plotting script ---------------------------------------------------------------

def _tiny_csv(folder):
    rows = []
    for x in (64, 128):
        for mode in ("forward", "full"):
            for provider, ms in (("gist_fast", 1.0), ("eager", 3.0), ("compile", 2.0)):
                rows.append(_row(provider=provider, mode=mode, x=x, value=(ms * x / 64, ms * x / 80, ms * x / 50)))
    rows.append(_row(op="gist_loss", provider="gist_fast", x=10, config={"B": 4}, value=0.5))
    rows.append(_row(op="gist_loss", provider="eager", x=10, config={"B": 4}, value=None, note="error: Boom"))
    cfg = {"model": "vit_tiny_patch16_224", "dtype": "fp32"}
    for impl, ms in (("eager", 10.0), ("gist_fast", 8.0)):
        rows += [harness.make_row(ENV, "train_step", impl, "step", "ms", "batch", 8, cfg, (ms, ms * 0.9, ms * 1.1)),
                 harness.make_row(ENV, "train_step", impl, "step", "img_per_s", "batch", 8, cfg, 800 / ms),
                 harness.make_row(ENV, "train_step", impl, "step", "saved_MB_per_img", "batch", 4, cfg, ms / 4)]
    for variant, mb in (("eager", 50.0), ("lean", 18.0)):
        rows.append(harness.make_row(ENV, "saved_activations", variant, "train", "MB_per_img", "batch", 4,
                                     {"model": "vit_base_patch16_224", "precision": "bf16-autocast"}, mb))
    harness.append_rows(os.path.join(folder, "results.csv"), rows)
    return rows


def test_the_summary_skips_a_largest_batch_that_was_not_measured():
    cfg = {"model": "vit_tiny_patch16_224", "dtype": "fp32"}
    rows = [harness.make_row(ENV, "train_step", "eager", "step", "ms", "batch", 8, cfg, (10.0, 9.0, 11.0)),
            harness.make_row(ENV, "train_step", "eager", "step", "ms", "batch", 32, cfg, None,
                             note="skipped: time budget")]
    summary = bench_report.train_markdown(rows).split("## Every cell")[0]
    assert "| eager | 8 | 10.0" in summary and "| 32 |" not in summary


def test_plot_script_draws_tables_and_pngs_from_a_csv(tmp_path, capsys):
    plot = _script("plot")
    _tiny_csv(str(tmp_path))
    assert plot.main([str(tmp_path)]) == 0
    names = {"ops.md", "ops_adapter.png", "ops_gist_loss.png", "bench.md", "bench_throughput.png",
             "bench_memory.png", "activation_memory.md"}
    assert names <= set(os.listdir(tmp_path))
    ops_md = (tmp_path / "ops.md").read_text()
    assert "| 64 | full | 1.00 ±" in ops_md and "| 3.00× | 2.00× |" in ops_md  # eager 3x, compile 2x gist_fast
    assert "error: Boom" in ops_md and "git abc1234" in ops_md and "cpu: test, 2 threads" in ops_md
    bench_md = (tmp_path / "bench.md").read_text()
    assert re.search(r"\| vit_tiny \| gist_fast \| 8 \| 8\.00 ±10% \| 100 \| 1\.25× \| 2\.00 \|", bench_md), bench_md
    assert "| lean | 18.0 | 36% |" in (tmp_path / "activation_memory.md").read_text()


def test_plot_script_adds_prunes_and_refuses_in_one_line(tmp_path, capsys):
    plot = _script("plot")
    first = _tiny_csv(str(tmp_path / "a"))
    newer = [_row(value=0.5)]
    harness.append_rows(str(tmp_path / "gpu.csv"), newer)
    assert plot.main([str(tmp_path / "a"), "--add", str(tmp_path / "gpu.csv"), "--prune", "--no-plots"]) == 0
    rows = harness.read_rows(str(tmp_path / "a" / "results.csv"))
    assert len(rows) == len(first) and newer[0] in rows  # the older row of that key is gone
    assert "| 64 | full | 0.500 |" in (tmp_path / "a" / "ops.md").read_text()
    capsys.readouterr()
    for argv, expected in (([str(tmp_path / "missing")], "no results CSV"),
                           ([str(tmp_path / "a"), "--add", "nope.csv"], "--add nope.csv"),
                           ([str(tmp_path / "a"), str(tmp_path), "--add", "x.csv"], "exactly one"),
                           (["--bad"], "--bad")):
        assert plot.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


# --- the op benchmarks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["adapter", "gist_loss", "distill_loss"])
def test_every_provider_computes_the_same_op(op):
    ops_bench = _script("bench_ops")
    spec, cpu = ops_bench.OPS[op], torch.device("cpu")
    config = dict(spec.configs["cpu"][0], **({"D": 48} if op == "adapter" else {"B": 6}))
    x = 33 if op == "adapter" else 17
    cases = {p: spec.setup(p, x, config, cpu) for p in ("gist_fast", "eager")}
    outs = {p: ops_bench._as_tuple(c.forward()) for p, c in cases.items()}
    for a, b in zip(outs["gist_fast"], outs["eager"]):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(cases["gist_fast"].leaves, cases["eager"].leaves))
    modes = ops_bench.op_modes(cases["gist_fast"])
    modes["backward"]()
    modes["full"]()
    assert all(t.grad is not None for t in cases["gist_fast"].leaves)
    assert cases["eager"].floor_bytes["full"] == sum(cases["eager"].floor_bytes[m] for m in ("forward", "backward"))
    with pytest.raises(ops_bench.NotApplicable):
        spec.setup("liger", x, config, cpu)


def test_bench_ops_appends_rows_and_refuses_bad_options(tmp_path, capsys):
    ops_bench = _script("bench_ops")
    argv = ["--device", "cpu", "--ops", "gist_loss", "--providers", "gist_fast,eager,liger", "--modes", "full,backward",
            "--xs", "7", "--rep-ms", "1", "--out", str(tmp_path), "--no-plots"]
    assert ops_bench.main(argv) == 0
    rows = harness.read_rows(str(tmp_path / "results.csv"))
    assert {(r.provider, r.mode, r.metric) for r in rows} == {(p, m, "ms") for p in ("gist_fast", "eager")
                                                             for m in ("full", "backward")}
    assert all(r.p50 > 0 and r.x_name == "classes" and r.x_value == 7 for r in rows)
    assert "| gist_loss | B=256, dtype=fp32 | classes=7 |" in (tmp_path / "ops.md").read_text()
    capsys.readouterr()
    for bad, expected in ((["--ops", "conv"], "--ops conv"), (["--device", "cuda:7"], "--device"),
                          (["--xs", "a"], "--xs a"), (["--modes", "both"], "--modes both")):
        assert ops_bench.main([*bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


# --- what is committed -----------------------------------------------------------------------------------

def test_committed_results_follow_the_schema_and_the_readme_copies_their_tables():
    folder = os.path.join(ROOT, "benchmarks", "results", "cpu")
    assert not os.path.exists(os.path.join(folder, "ops.json"))  # no raw pytest-benchmark dumps
    rows = harness.read_rows(os.path.join(folder, "results.csv"))
    assert {"train_step", "saved_activations", "adapter", "gist_loss", "distill_loss"} <= {r.op for r in rows}
    generated = "".join(open(os.path.join(folder, f)).read() for f in ("bench.md", "ops.md", "activation_memory.md"))
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Benchmarks"):readme.index("## Layout")]
    table_lines = [line for line in section.splitlines() if line.startswith("|") and "---" not in line]
    assert table_lines and all(line in generated for line in table_lines), "README tables are not the generated ones"


def test_command_lines_end_in_one_line_and_ctrl_c_keeps_the_rows(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert harness.run_cli("x", interrupted) == 130
    assert "interrupted" in capsys.readouterr().err
    assert harness.positive_ints("8,32", "--batches") == [8, 32]
    for bad in ("0", "-5", "8,x", ""):
        with pytest.raises(ValueError, match="--xs .*integers, each --xs >= 1"):
            harness.positive_ints(bad, "--xs")
    assert bench.main([*TINY, "--steps", "0"]) == 2  # 0 is not "the default"
    assert "--steps >= 1" in capsys.readouterr().err
