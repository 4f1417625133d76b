"""The command line as a new user meets it: every mistake is one line (exit 2, nothing written), an
earlier run is never overwritten or silently reused, resumed runs and sweeps continue where they stopped."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from gist_fast import cli
from train_helpers import TINY, make_task, one_line_error, tiny, train, trained_tensors

SHORT = ["--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "8"]
RUN = ["--fused", "off", "--workers", "0", "--no-progress"]  # TINY without its model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_task(root)
    return root


@pytest.mark.parametrize("argv, expected", [
    (["--model", "resnet18", *RUN], ["--model resnet18", "VisionTransformer"]),
    (["--model", "eva02_tiny_patch14_224", *RUN], ["--model eva02_tiny_patch14_224", "got Eva"]),
    (["--model", "vit_base_patch16_244", *RUN], ["not a timm model", "vit_base_patch16_224"]),
    (["--model", "vit_tiny_patch16_224", "--model-kwargs", "depht=2", *RUN], ["--model-kwargs", "depht"]),
    ([*TINY, "--memory-budget", "lots"], ["--memory-budget", "'lots' is not a memory size"]),
    ([*TINY, "--memory", "some"], ["--memory", "lean"]),
    ([*TINY, "--framework", "two-stage", "--epochs", "2", "--channels-k", "500"], ["--channels-k 500", "48 channels"]),
    ([*TINY, "--framework", "two-stage", "--stage1-epochs", "1"], ["--stage1-epochs 1", "stage 2"]),
    ([*TINY, "--channels-k", "8"], ["--framework gist does not use --channels-k"]),
    ([*TINY, "--framework", "linear", "--rank", "8"], ["does not use --rank"]),
    ([*TINY, "--epochs", "0"], ["--epochs 0: must be >= 1"]),
    ([*TINY, "--lr", "-1"], ["--lr -1.0: must be > 0"]),
    ([*TINY, "--drop-path", "1.5"], ["--drop-path 1.5"]),
    ([*TINY, "--device", "banana"], ["--device 'banana'", "cpu, cuda or cuda:N"]),
    ([*TINY, "--device", "cuda:99"], ["--device cuda:99"]),
    ([*TINY, "--pretrained", "--pretrained-file", "x.pth"], ["--pretrained and --pretrained-file"]),
    ([*TINY, "--num-classes", "10"], ["--num-classes 10", "kitti has 4"]),
    ([*TINY, "--lr", "inf"], ["--lr inf"]),
    ([*TINY, "--lr", "0.001", "--min-lr", "0.01"], ["--min-lr 0.01", "must not exceed --lr 0.001"]),
    ([*TINY, "--model-kwargs", "img_size=32,patch_size=8,embed_dim=48,depth=0,num_heads=3"], ["at least one block"]),
    ([*TINY, "--model-kwargs", "img_size=32,num_classes=7"], ["num_classes: set by --num-classes"]),
    ([*TINY, "--peft", "channels"], ["--peft", "invalid choice"]),
])
def test_each_mistake_is_one_line_and_writes_nothing(root, tmp_path, capsys, argv, expected):
    code = cli.main(["train", "--data", str(root), "--task", "kitti", "--output", str(tmp_path / "out"), *SHORT, *argv])
    one_line_error(capsys, code, *expected)
    assert not (tmp_path / "out").exists()


def test_missing_data_folder_and_unknown_sweep_task(root, tmp_path, capsys):
    one_line_error(capsys, cli.main(["train", "--data", str(tmp_path / "nope"), *TINY]), "data folder not found")
    code = cli.main(["vtab", "--data", str(root), "--task", "kitti", "--output", str(tmp_path / "v"), *TINY])
    one_line_error(capsys, code, "unrecognized arguments: --task kitti")
    code = cli.main(["vtab", "--data", str(root), "--tasks", "kitti,cifar", "--output", str(tmp_path / "v"), *TINY])
    one_line_error(capsys, code, "cifar", "not found")  # every task folder is checked before the first trains
    assert not (tmp_path / "v").exists()


def test_output_that_is_a_file_and_an_empty_sweep(root, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, cli.main(["train", "--output", str(tmp_path / "afile"), *SHORT, *TINY]), "afile")
    code = cli.main(["vtab", "--data", str(root), "--tasks", ",", "--output", str(tmp_path / "v"), *TINY])
    one_line_error(capsys, code, "--tasks: the list is empty")


def test_a_diverging_run_is_an_error_not_a_result(root, tmp_path, capsys):
    assert train(root, tmp_path / "a", "--framework", "linear", "--lr", "1e30") == 2
    assert re.search(r"training diverged in epoch \d: the train loss is \S+, the weights (not )?finite",
                     capsys.readouterr().err)
    assert not (tmp_path / "a" / "result.json").exists()  # no result; a last.pt only of finite epochs
    last = tmp_path / "a" / "last.pt"
    assert not last.exists() or all(t.isfinite().all() for t in trained_tensors(last).values())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.jsonl").write_text('{"event": "start"}\n')  # a run killed before it saved
    assert train(root, tmp_path / "b", "--framework", "linear") == 0  # a log alone is nothing to keep


def test_resume_and_eval_refuse_foreign_files(root, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code = cli.main(["train", "--resume", str(tmp_path / "notes.txt")])
    one_line_error(capsys, code, "not a gist-fast train checkpoint")
    one_line_error(capsys, cli.main(["eval", str(tmp_path / "notes.txt")]), "not a gist-fast train checkpoint")
    assert train(root, tmp_path / "run") == 0
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.pt")  # a best-accuracy checkpoint: no optimizer state
    one_line_error(capsys, cli.main(["train", "--resume", best]), "cannot be resumed", "last.pt")


def test_a_used_output_is_refused_unless_overwrite(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(root, out, "--framework", "linear") == 0
    before = {f: (out / f).stat().st_mtime_ns for f in ("last.pt", "best.pt", "log.jsonl", "result.json")}
    capsys.readouterr()
    one_line_error(capsys, train(root, out, "--framework", "linear"), "--resume", "--overwrite", "another --output")
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before
    assert train(root, out, "--framework", "adapter", "--overwrite", "--stop-after-steps", "1") == 0
    assert not (out / "best.pt").exists() and not (out / "result.json").exists()  # nothing of the old run is kept
    assert torch.load(out / "last.pt", weights_only=False)["config"]["framework"] == "adapter"
    other = tmp_path / "other"
    assert train(root, other, "--framework", "linear") == 0
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(out / "last.pt"), "--output", str(other)])  # not over another run
    one_line_error(capsys, code, "holds an earlier run")


def test_resume_writes_where_the_checkpoint_is_with_relative_data(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root, "data")
    argv = ["train", "--data", "data", "--task", "kitti", "--output", "a", "--stop-after-steps", "1", *SHORT, *TINY]
    assert cli.main(argv) == 0
    shutil.move("a", "b")
    os.mkdir("elsewhere")
    monkeypatch.chdir("elsewhere")
    assert cli.main(["train", "--resume", str(tmp_path / "b" / "last.pt")]) == 0
    assert (tmp_path / "b" / "result.json").exists() and not (tmp_path / "a").exists()
    assert not os.listdir(".")  # nothing written where the command ran


def test_vtab_reuses_only_a_matching_result_and_resumes_a_stopped_sweep(root, tmp_path, capsys):
    sweep = ["vtab", "--data", str(root), "--tasks", "kitti", "--output", str(tmp_path), *SHORT, *TINY]
    assert cli.main([*sweep, "--framework", "linear"]) == 0
    linear = json.loads((tmp_path / "kitti" / "result.json").read_text())
    capsys.readouterr()
    assert cli.main([*sweep, "--framework", "linear"]) == 0  # the same settings: read back, not trained
    assert "== kitti" not in capsys.readouterr().out
    one_line_error(capsys, cli.main([*sweep, "--framework", "adapter"]), "kitti", "--framework", "--overwrite")
    assert cli.main([*sweep, "--framework", "adapter", "--overwrite"]) == 0
    adapter = json.loads((tmp_path / "kitti" / "result.json").read_text())
    assert adapter["framework"] == "adapter" and adapter["trainable"] > linear["trainable"]
    table = json.loads((tmp_path / "vtab.json").read_text())
    assert table["tasks"]["kitti"]["trainable"] == adapter["trainable"]

    stopped = ["vtab", "--data", str(root), "--tasks", "kitti", "--output", str(tmp_path / "s"), *TINY,
               "--epochs", "2", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "8"]
    capsys.readouterr()
    assert cli.main([*stopped, "--stop-after-steps", "1"]) == 0
    assert "run the same gist-fast vtab command again" in capsys.readouterr().err
    assert cli.main(stopped) == 0
    assert "== kitti (continued from last.pt)" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "s" / "kitti" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epoch" in r and "event" not in r] == [1, 2]


def test_eval_reports_the_split_it_evaluated(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):  # no test/: val/ is evaluated and must be named so
        for c in ("cat", "dog"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 12), (200 * (c == "cat"), 90, i)).save(tmp_path / "data" / split / c / f"{i}.png")
    argv = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--framework", "linear",
            *SHORT, *TINY]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "out" / "best.pt"), "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "val"
    one_line_error(capsys, cli.main(["eval", str(tmp_path / "out" / "best.pt"), "--split", "nope"]), "nope")


def test_eval_on_the_embedded_digits_names_its_splits(tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path), "--epochs", "1", "--warmup-epochs", "0", *RUN]
    assert cli.main(argv) == 0
    for split, expected in ((None, "test"), ("test", "test"), ("train", "train")):
        capsys.readouterr()
        assert cli.main(["eval", str(tmp_path / "best.pt"), *(["--split", split] if split else [])]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == expected
    one_line_error(capsys, cli.main(["eval", str(tmp_path / "best.pt"), "--split", "val200"]), "--split val200")
    one_line_error(capsys, cli.main(["eval", str(tmp_path / "best.pt"), "--device", "banana"]), "--device")


def test_random_backbone_warning_schedule_and_memory_option(root, tmp_path, capsys):
    argv = [*tiny(), "--fused", "auto", "--memory", "min", "--epochs", "1", "--warmup-epochs", "3",
            "--cooldown-epochs", "0", "--batch-size", "8", "--stop-after-steps", "1"]
    assert cli.main(["train", "--data", str(root), "--task", "kitti", "--output", str(tmp_path), *argv]) == 0
    captured = capsys.readouterr()
    assert "schedule: 1 epochs: 1 of cosine decay" in captured.out
    assert "3-epoch warm-up is not shorter than the 1-epoch cosine" in captured.out
    assert "no --pretrained or --pretrained-file" in captured.err
    assert torch.load(tmp_path / "last.pt", weights_only=False)["student"]["gist_fast_config"]["memory"] == "min"


def test_version_and_import_without_triton(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("gist-fast 0.")
    code = "import sys, gist_fast; assert 'triton' not in sys.modules, 'import gist_fast imported triton'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
