"""`gist-fast bench` end to end on a tiny input: JSON, markdown and PNGs land in the output folder."""
import json

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
