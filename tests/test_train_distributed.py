"""torchrun with two gloo processes trains the same weights as one process with the same global batch."""
import json
import os
import subprocess
import sys

import torch

from train_helpers import TINY, make_task, trained_tensors


def _run(prefix, root, out):
    cmd = [*prefix, "-m", "gist_fast", "train", "--data", str(root), "--task", "kitti", "--output", str(out),
           "--framework", "adapter", "--epochs", "2", "--warmup-epochs", "0", "--cooldown-epochs", "0",
           "--batch-size", "8", "--device", "cpu", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_ddp_equals_one_process(tmp_path):
    make_task(tmp_path, train_per_class=4, test_per_class=3)  # 16 train images: two global batches of 8
    _run([sys.executable], tmp_path, tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
               tmp_path, tmp_path / "two")
    assert two.stdout.count("done:") == 1  # rank 0 reports, writes and saves
    one_w, two_w = trained_tensors(tmp_path / "one" / "last.pt"), trained_tensors(tmp_path / "two" / "last.pt")
    for name, t in one_w.items():
        torch.testing.assert_close(two_w[name], t, rtol=1e-5, atol=1e-6, msg=name)
    starts = [json.loads(open(tmp_path / d / "log.jsonl").readline())["world_size"] for d in ("one", "two")]
    assert starts == [1, 2]
    one, two = (json.loads(open(tmp_path / d / "log.jsonl").read().splitlines()[-2]) for d in ("one", "two"))
    assert one["test_acc"] == two["test_acc"]  # 12 test images split 6 + 6, counts summed across ranks
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5
