"""`gist-fast bench` end to end on a tiny input: JSON, markdown and PNGs land in the output folder."""
import inspect
import json

import torch

import gist_fast
from gist_fast import bench


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "results"
    rc = bench.main(["--models", "vit_tiny", "--impls", "eager,checkpoint,gist_fast", "--batches", "2",
                     "--steps", "1", "--warmup", "0", "--img-size", "48", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert {"torch", "timm", "git_sha", "date", "device"} <= set(data["environment"])
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "checkpoint", "gist_fast"}
    assert rows["gist_fast"]["loss_diff_vs_eager"] < 1e-4
    assert rows["gist_fast"]["saved_mb_per_image"] < rows["eager"]["saved_mb_per_image"]
    assert rows["eager"]["images_per_s"] > 0 and rows["eager"]["max_batch_in_budget"] > 0
    assert "| vit_tiny | gist_fast |" in (out / "bench.md").read_text()
    for png in ("bench_throughput.png", "bench_memory.png"):
        assert (out / png).stat().st_size > 1000


def test_step_gflops_vit_base_about_70():
    import timm

    assert 65 < bench.step_gflops(timm.create_model("vit_base_patch16_224", pretrained=False)) < 75


def test_time_budget_skips_later_cells_and_publishes_after_each(monkeypatch):
    allows = iter([True] + [False] * 20)  # the budget runs out after the first cell
    monkeypatch.setattr(bench.Deadline, "allows", lambda self, seconds=0.0: next(allows))
    published = []
    args = bench._parse(["--models", "vit_tiny", "--impls", "gist_fast,eager", "--batches", "2,3", "--steps", "1",
                         "--warmup", "0", "--img-size", "32", "--device", "cpu", "--memory-budget", "none"])
    result = bench.run(args, on_result=lambda r: published.append(len(r["rows"])))
    assert published == [2, 4]  # one CPU cell times every implementation at one batch
    assert [(r["impl"], r["batch"], "skipped" in r) for r in result["rows"]] == [
        ("eager", 2, False), ("gist_fast", 2, False), ("eager", 3, True), ("gist_fast", 3, True)]
    assert "| vit_tiny | gist_fast | 3 | skipped: time budget |" in bench.markdown(result)


def test_default_patch_impl_and_git_sha_from_the_environment(monkeypatch):
    assert bench.MEMORY["gist_fast_auto"] == inspect.signature(gist_fast.patch).parameters["memory"].default
    monkeypatch.setenv("GIT_SHA", "abc1234")
    assert bench.environment(torch.device("cpu"))["git_sha"] == "abc1234"


def test_bad_options_are_one_line_and_memory_selects_impls(tmp_path, capsys):
    for argv, expected in ((["--models", "resnet18"], "--models resnet18"), (["--batches", "0"], "--batches >= 1"),
                           (["--device", "gpu"], "--device gpu"), (["--memory", "some"], "--memory some"),
                           (["--impls", "fast"], "--impls fast")):
        assert bench.main([*argv, "--no-plots", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert bench.select_impls(None, "lean,none") == ["eager", "checkpoint", "gist_fast", "gist_fast_ops",
                                                     "eager_compile", "gist_fast_compile"]
    assert bench.select_impls("eager,gist_fast_min,gist_fast_auto", "min") == ["eager", "gist_fast_min"]
    assert bench.select_impls(None, None) == list(bench.IMPLS)
