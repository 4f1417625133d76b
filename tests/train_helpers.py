"""A tiny VTAB-1K-layout dataset and tiny-model options for the `gist-fast train` tests."""
import os

import numpy as np
import torch
from PIL import Image

from gist_fast import cli

TINY = ["--model", "vit_tiny_patch16_224",
        "--model-kwargs", "img_size=32,patch_size=8,embed_dim=48,depth=2,num_heads=3",
        "--fused", "off", "--workers", "0", "--no-progress"]
TEACHER = ["--teacher", "vit_tiny_patch16_224",
           "--teacher-kwargs", "img_size=32,patch_size=8,embed_dim=24,depth=1,num_heads=3"]


def tiny(framework="gist"):
    """The tiny-model options; iDAT's also name its teacher (other frameworks refuse teacher options)."""
    return TINY + (TEACHER if framework == "idat" else [])


def make_task(root, task="kitti", classes=4, train_per_class=4, test_per_class=2, seed=0):
    """ROOT/<task>/ with class-coloured noisy 16x16 PNGs and the four list files of METHODS §5."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, task)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lists = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        lines = []
        for c in range(classes):
            for i in range(per_class):
                base = np.zeros((16, 16, 3))
                base[..., c % 3] = 200 if c < 3 else 0
                base[: 8 * (c // 3 + 1)] += 40
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                name = f"images/{split}_{c}_{i}.png"
                Image.fromarray(pixels).save(os.path.join(folder, name))
                lines.append(f"{name} {c}")
        lists[split] = lines
    def write(name, lines):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")

    write("train800val200.txt", lists["train"])
    write("train800.txt", lists["train"][::2])
    write("val200.txt", lists["train"][1::2])
    write("test.txt", lists["test"])
    return folder


def train(root, out, *extra, task="kitti"):
    """`gist-fast train` on the tiny task, two short epochs; returns the exit code."""
    argv = ["train", "--data", str(root), "--task", task, "--output", str(out), "--epochs", "2",
            "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "8",
            *tiny("idat" if "idat" in extra else "gist"), *extra]
    return cli.main(argv)


def trained_tensors(path):
    return torch.load(path, weights_only=False)["student"]["state_dict"]


def one_line_error(capsys, code, *expected):
    """A CLI mistake: exit 2 and one line on stderr, no traceback, naming each of `expected`."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err
