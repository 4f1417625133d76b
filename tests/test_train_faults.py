"""Bad input fails with the file and the line; interrupts save a resumable checkpoint; resuming
continues exactly; a crash while saving leaves the last good checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gist_fast import cli
from gist_fast.training import checkpoint, data
from train_helpers import TINY, make_task, train

SIZE = (32, 32)


@pytest.fixture()
def root(tmp_path):
    make_task(tmp_path)
    return tmp_path


def _edit_line(path, n, text):
    lines = open(path).read().splitlines()
    lines[n - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def test_missing_list_file(root):
    os.remove(root / "kitti" / "test.txt")
    with pytest.raises(data.DataError, match=r"kitti/test.txt: list file not found"):
        data.build(str(root), "kitti", None, SIZE)


def test_malformed_line_names_file_and_line(root):
    _edit_line(root / "kitti" / "train800val200.txt", 3, "images/train_0_2.png three")
    with pytest.raises(data.DataError, match=r"train800val200.txt:3: expected '<image path> <integer label>'"):
        data.build(str(root), "kitti", None, SIZE)


def test_label_out_of_range_for_the_task(root):
    _edit_line(root / "kitti" / "test.txt", 5, "images/test_2_0.png 4")  # kitti has 4 classes: 0..3
    with pytest.raises(data.DataError,
                       match=r"test.txt:5: label 4 is outside 0..3 \(num_classes=4 from the VTAB-1K table"):
        data.build(str(root), "kitti", None, SIZE)


def test_labels_beyond_the_given_class_count(root, capsys):
    make_task(root, task="mine")  # not a VTAB-1K task: its class count is the user's word
    assert train(root, root / "out", "--num-classes", "3", task="mine") == 2  # labels go up to 3
    err = capsys.readouterr().err
    assert "train800val200.txt:13: label 3 is outside 0..2 (num_classes=3 from --num-classes)" in err


def test_missing_and_unreadable_images(root):
    os.remove(root / "kitti" / "images" / "test_1_1.png")
    with pytest.raises(data.DataError, match=r"test.txt:4: image not found: .*test_1_1.png"):
        data.build(str(root), "kitti", None, SIZE)
    make_task(root)
    (root / "kitti" / "images" / "train_2_1.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=r"train800val200.txt:10: cannot read image .*train_2_1.png"):
        data.build(str(root), "kitti", None, SIZE)  # found before any training


def test_missing_pretrained_file(root, capsys):
    assert train(root, root / "out", "--pretrained-file", str(root / "nope.pth")) == 2
    assert "nope.pth: pretrained file not found" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["idat", "gist", "two-stage"])
def test_resume_after_stop_mid_epoch_is_exact(root, framework):
    """4 epochs of 2 steps; the interrupted run stops after 3 steps (mid-epoch 2) and resumes. With
    drop-path and the gist token's dropout on; two-stage switches stages at epoch 2."""
    common = ["--framework", framework, "--drop-path", "0.1", "--epochs", "4"]
    common += ["--stage1-epochs", "2"] if framework == "two-stage" else []
    assert train(root, root / "full", *common) == 0
    assert train(root, root / "cut", *common, "--stop-after-steps", "3") == 0
    state = torch.load(root / "cut" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    assert cli.main(["train", "--resume", str(root / "cut" / "last.pt"), "--no-progress"]) == 0
    full, cut = (torch.load(root / d / "last.pt", weights_only=False) for d in ("full", "cut"))
    for part in ("student", "teacher")[: 1 + (framework == "idat")]:
        assert full[part]["gist_fast_config"] == cut[part]["gist_fast_config"]
        for name, t in full[part]["state_dict"].items():
            assert torch.equal(t, cut[part]["state_dict"][name]), name
    assert full["best_acc"] == cut["best_acc"]


def test_resume_refuses_a_changed_recipe(root, capsys):
    assert train(root, root / "a", "--stop-after-steps", "1") == 0
    assert cli.main(["train", "--resume", str(root / "a" / "last.pt"), "--lr", "0.5"]) == 2
    assert "differ from it: --lr" in capsys.readouterr().err


def test_sigint_saves_a_resumable_checkpoint_and_exits(root):
    out = root / "sig"
    cmd = [sys.executable, "-m", "gist_fast", "train", "--data", str(root), "--task", "kitti", "--output", str(out),
           "--epochs", "10000", "--batch-size", "8", *TINY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(__file__))
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline:  # wait for an epoch to finish
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "SIGINT: saved a resumable checkpoint" in err
    state = checkpoint.load(str(out / "last.pt"))
    assert state["epoch"] >= 1


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    good = {"student": {"gist_fast_config": {}, "state_dict": {"w": torch.ones(3)}}, "config": {}}
    checkpoint.atomic_save(good, path)

    def torn_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"student": {"state_dict": {"w": torch.zeros(3)}}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["student"]["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
