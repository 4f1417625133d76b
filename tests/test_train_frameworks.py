"""`gist-fast train` end to end on a tiny VTAB-layout task: every framework, the recipe's optimizer
and schedule, `gist-fast eval`, `gist-fast vtab`, the embedded default, the bench dispatch."""
import json
import sys
import types

import pytest
import torch

import gist_fast
from gist_fast import cli
from gist_fast.training import models
from gist_fast.training.recipe import TrainConfig, resolve
from train_helpers import TINY, make_task, train, trained_tensors


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_task(root)
    return root


@pytest.mark.parametrize("framework", ["gist", "adapter", "idat", "two-stage", "linear"])
def test_each_framework_trains_logs_and_checkpoints(root, tmp_path, framework):
    assert train(root, tmp_path, "--framework", framework) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["framework"] == framework and 0 <= result["last_acc"] <= 100
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if "epoch" in r and "test_acc" in r] == [1, 2]
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and set(last) >= {"optimizers", "schedulers", "per_rank", "best_acc"}
    peft = last["student"]["gist_fast_config"]["peft"]
    assert peft == {"gist": "adapter", "adapter": "adapter", "idat": "seq-adapter", "two-stage": "channels",
                    "linear": "linear"}[framework]
    assert last["student"]["gist_fast_config"]["gist"] == (framework == "gist")
    if framework == "two-stage":  # the selected channels travel in the checkpoint; k = D/8 = 6
        assert [len(c) for c in last["student"]["gist_fast_config"]["channels"]] == [6, 6]
        assert any(json.loads(line).get("event") == "stage2"
                   for line in (tmp_path / "log.jsonl").read_text().splitlines())
    if framework == "idat":  # the teacher is kept for resuming only: best.pt is the student alone
        assert last["teacher"] is not None and len(last["optimizers"]) == 2
        assert "teacher" not in torch.load(tmp_path / "best.pt", weights_only=False)


def test_peft_override_and_eval_command(root, tmp_path, capsys):
    assert train(root, tmp_path, "--framework", "adapter", "--peft", "adaptformer") == 0
    best = json.loads((tmp_path / "result.json").read_text())["best_acc"]
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "best.pt"), "--workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["split"] == "test" and out["acc"] == pytest.approx(best)
    assert cli.main(["eval", str(tmp_path / "best.pt"), "--split", "val200", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8


def test_image_folder_tree(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), (200 * (c == "cat"), 90, i)).save(tmp_path / "data" / split / c / f"{i}.png")
    argv = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--framework", "linear",
            "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "4", *TINY]
    assert cli.main(argv) == 0
    start = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    assert (start["train_images"], start["test_images"]) == (6, 4)


def test_recipe_defaults_task_table_and_overrides():
    cfg = resolve(TrainConfig(data="/x", task="eurosat"))
    assert (cfg.lr, cfg.weight_decay, cfg.drop_path) == (3e-3, 5e-2, 0.2)
    assert (cfg.epochs, cfg.cooldown_epochs, cfg.warmup_epochs, cfg.batch_size, cfg.seed) == (100, 10, 10, 64, 42)
    assert (cfg.warmup_lr, cfg.min_lr) == (1e-7, 1e-8)
    # GIST's and iDAT's code loads timm 0.6.13's vit_base_patch16_224_in21k: the AugReg weights; the two-stage
    # reconstruction follows the authors' SCT code: the original ones
    for framework in ("gist", "adapter", "idat", "linear"):
        assert resolve(TrainConfig(data="/x", framework=framework)).model == "vit_base_patch16_224.augreg_in21k"
    assert resolve(TrainConfig(data="/x", framework="two-stage")).model == "vit_base_patch16_224.orig_in21k"
    assert resolve(TrainConfig(data="/x", framework="idat")).teacher == "vit_small_patch16_224.augreg_in21k"
    assert resolve(TrainConfig(data="/x", task="eurosat", lr=0.1)).lr == 0.1  # the command line wins


def test_optimizer_decays_matrices_and_gist_token_and_schedule_shape():
    cfg = resolve(TrainConfig(epochs=10, cooldown_epochs=2, warmup_epochs=2, lr=1e-2, weight_decay=0.05))
    model = gist_fast.patch(models.backbone(cfg.model, cfg.model_kwargs, 10, 0.0, 0), verbose=False)
    opt = models.optimizer(model, cfg)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert any(p is model.gist_token for p in decayed["params"])  # the 1x1xD token is decayed
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert ({id(p) for g in opt.param_groups for p in g["params"]}
            == {id(p) for p in model.parameters() if p.requires_grad})
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    sched, lrs = models.scheduler(opt, cfg), []
    for epoch in range(cfg.total_epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7) and lrs[1] == pytest.approx(1e-7 + (1e-2 - 1e-7) / 2)
    assert max(lrs) <= 1e-2 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # cosine decreases
    assert lrs[-2:] == [pytest.approx(1e-8)] * 2  # cool-down at min_lr


def test_vtab_command_tabulates_task_and_group_means(tmp_path, capsys):
    make_task(tmp_path / "data", "kitti", classes=4)
    make_task(tmp_path / "data", "patch_camelyon", classes=2)
    argv = ["vtab", "--data", str(tmp_path / "data"), "--tasks", "kitti,patch_camelyon",
            "--output", str(tmp_path / "out"),
            "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "8",
            "--framework", "linear", *TINY]
    assert cli.main(argv) == 0
    table = json.loads((tmp_path / "out" / "vtab.json").read_text())
    accs = {t: r["last_acc"] for t, r in table["tasks"].items()}
    assert set(accs) == {"kitti", "patch_camelyon"}
    assert table["last_acc"]["mean_of_tasks"] == pytest.approx(sum(accs.values()) / 2)
    assert table["last_acc"]["groups"] == {"specialized": accs["patch_camelyon"], "structured": accs["kitti"]}
    assert table["missing_groups"] == ["natural"]
    md = (tmp_path / "out" / "vtab.md").read_text()
    assert "mean of group means" in md and "patch_camelyon" in md


def test_embedded_digits_default_learns(tmp_path):
    """No --data: sklearn's digits on the small default ViT; two epochs are far above 10% chance."""
    argv = ["train", "--output", str(tmp_path), "--epochs", "2", "--warmup-epochs", "0", "--fused", "off",
            "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["task"] == "digits" and result["last_acc"] >= 50.0


def test_bench_is_dispatched_with_its_arguments(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "gist_fast.bench", types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0))
    monkeypatch.setattr(gist_fast, "bench", sys.modules["gist_fast.bench"], raising=False)
    assert cli.main(["bench", "--quick", "x"]) == 0 and seen == [["--quick", "x"]]


def test_memory_budget_accumulates_to_the_same_update(root, tmp_path, capsys):
    assert train(root, tmp_path / "whole", "--framework", "adapter") == 0
    assert train(root, tmp_path / "budget", "--framework", "adapter", "--memory-budget", "700kB") == 0
    micro = int(capsys.readouterr().out.split("micro-batches of ")[1].split()[0])
    assert 1 < micro < 8  # the budget really splits the batch of 8 (unevenly: each share weighted)
    whole, budget = trained_tensors(tmp_path / "whole" / "last.pt"), trained_tensors(tmp_path / "budget" / "last.pt")
    for name, t in whole.items():
        torch.testing.assert_close(budget[name], t, rtol=1e-5, atol=1e-6, msg=name)
