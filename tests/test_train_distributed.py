"""torchrun with two gloo processes trains the same weights as one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gist_fast.training import distributed
from train_helpers import make_task, tiny, trained_tensors

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(prefix, root, out, *extra, framework="adapter"):
    cmd = [*prefix, "-m", "gist_fast", "train", "--data", str(root), "--task", "kitti", "--output", str(out),
           "--framework", framework, "--epochs", "2", "--warmup-epochs", "0", "--cooldown-epochs", "0",
           "--batch-size", "8", "--device", "cpu", *tiny(framework), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_run(one_dir, two_dir):
    """Same trained tensors, train loss and accuracy, test accuracy."""
    one_w, two_w = trained_tensors(one_dir / "last.pt"), trained_tensors(two_dir / "last.pt")
    for name, t in one_w.items():
        torch.testing.assert_close(two_w[name], t, rtol=1e-5, atol=1e-6, msg=name)
    one, two = (json.loads(open(d / "log.jsonl").read().splitlines()[-2]) for d in (one_dir, two_dir))
    assert one["test_acc"] == two["test_acc"]  # test images split between the ranks, counts summed
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5
    assert one["train_acc"] == two["train_acc"]


def test_sampler_marks_padding_in_the_last_global_batch():
    """15 samples, global batch 8 on 2 ranks: the ranks' k-th batches of 4 are the one-process
    k-th chunk of 8; the one padded position (index 15) is labelled IGNORE; skip resumes."""
    data = [(float(i), i % 4) for i in range(15)]
    one = list(distributed.TrainSampler(data, num_replicas=1, rank=0, seed=3))
    ranks = [list(distributed.TrainSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    for k in range(2):
        merged = [i for pair in zip(ranks[0][4 * k:4 * k + 4], ranks[1][4 * k:4 * k + 4]) for i in pair]
        assert [i for i in merged if i < 15] == one[8 * k:8 * k + 8]
    assert sorted(one) == list(range(15)) and ranks[1][-1] == 15
    padded = distributed.Padded(data)
    assert padded[15] == (0.0, distributed.IGNORE) and padded[3] == data[3]
    assert [distributed.global_rows(15, 8, k) for k in (0, 1)] == [8, 7]
    sampler = distributed.TrainSampler(data, num_replicas=2, rank=1, seed=3)
    sampler.skip = 4
    assert list(sampler) == ranks[1][4:] and len(sampler) == 4


def test_two_process_ddp_equals_one_process(tmp_path):
    make_task(tmp_path, train_per_class=4, test_per_class=3)  # 16 train images: two global batches of 8
    _run([sys.executable], tmp_path, tmp_path / "one")
    two = _run(TORCHRUN, tmp_path, tmp_path / "two")
    assert two.stdout.count("done:") == 1  # rank 0 reports, writes and saves
    starts = [json.loads(open(tmp_path / d / "log.jsonl").readline())["world_size"] for d in ("one", "two")]
    assert starts == [1, 2]
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def _uneven_task(root):
    """The tiny task with 15 train images: global batches of 8 and 7."""
    lists = os.path.join(make_task(root, train_per_class=4, test_per_class=3), "train800val200.txt")
    lines = open(lists).read().splitlines()
    open(lists, "w").write("\n".join(lines[:-1]) + "\n")


@pytest.mark.parametrize("framework, extra", [("adapter", []), ("idat", []), ("two-stage", []),
                                              ("adapter", ["--memory-budget", "600kB"])])
def test_uneven_train_set_equals_one_process(tmp_path, framework, extra):
    """15 train images, global batch 8: the last batch has 7, which the sampler pads to 8 so that
    both ranks get 4 (rank 1's last is the padding). The padded row must neither train nor count
    in train_loss / train_acc. The budget splits each rank's 4 images into micro-batches, one of
    them padding only."""
    _uneven_task(tmp_path)
    _run([sys.executable], tmp_path, tmp_path / "one", framework=framework)
    two = _run(TORCHRUN, tmp_path, tmp_path / "two", *extra, framework=framework)
    if extra:
        assert 1 < int(two.stdout.split("micro-batches of ")[1].split()[0]) < 4
    assert json.loads(open(tmp_path / "two" / "log.jsonl").readline())["train_images"] == 15
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_two_process_resume_into_the_padded_batch(tmp_path):
    """Stopped after 3 steps, the two-process run resumes at epoch 2's last (padded) batch and ends
    as one uninterrupted process does."""
    _uneven_task(tmp_path)
    _run([sys.executable], tmp_path, tmp_path / "one")
    _run(TORCHRUN, tmp_path, tmp_path / "two", "--stop-after-steps", "3")
    state = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    resume = [*TORCHRUN, "-m", "gist_fast", "train", "--resume", str(tmp_path / "two" / "last.pt"), "--no-progress"]
    done = subprocess.run(resume, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
