"""Datasets: ImageFolder trees found as torchvision's ImageFolder finds them, unreadable images
caught when the dataset is built, the split each set evaluates, and DataErrors from loader workers
cut back to our one line."""
import os
import re

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from gist_fast.training import data
from train_helpers import make_task

SIZE = (16, 16)


def png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)


def tree(root, layout):
    """layout: {"train/cat": ["0.png", "sub/1.png"], "train/empty": []}; every folder is made."""
    for folder, files in layout.items():
        os.makedirs(root / folder, exist_ok=True)
        for name in files:
            if name.endswith(".txt") or os.path.basename(name).startswith("."):  # e.g. AppleDouble ._x.png
                (root / folder / name).write_bytes(b"\x00\x05\x16\x07 not an image")
            else:
                png(str(root / folder / name))
    return str(root)


def paths(dataset, root):
    return [(os.path.relpath(s.path, root), s.label) for s in dataset.samples]


def test_image_folder_finds_nested_images_like_torchvision(tmp_path):
    root = tree(tmp_path, {"train/cat": ["b.png", "a/z.PNG", "a/b/y.Jpg", "notes.txt", "._b.png", ".x.png"],
                           "train/dog": ["0.png"], "val/dog": ["deep/1.png"], "val/cat": ["2.png"]})
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "dog" / "linked")  # followed, as os.walk(followlinks=True)
    png(str(tmp_path / "elsewhere" / "l.png"))
    train, test, classes = data.build(root, None, None, SIZE)
    assert classes == 2
    assert paths(train, root) == [("train/cat/b.png", 0), ("train/cat/a/z.PNG", 0), ("train/cat/a/b/y.Jpg", 0),
                                  ("train/dog/0.png", 1), ("train/dog/linked/l.png", 1)]
    assert paths(test, root) == [("val/cat/2.png", 0), ("val/dog/deep/1.png", 1)]


def test_hidden_class_folders_are_refused_even_with_images(tmp_path):
    """torchvision would make .ipynb_checkpoints a class; a hidden folder is never meant as one."""
    root = tree(tmp_path, {"train/cat": ["0.png"], "train/dog": ["0.png"], "train/.ipynb_checkpoints": ["0.png"],
                           "val/cat": ["1.png"]})
    with pytest.raises(data.DataError, match=r"train: hidden folder\(s\) \['.ipynb_checkpoints'\] would be classes"):
        data.build(root, None, None, SIZE)


def test_one_class_and_symlink_loops_are_refused(tmp_path):
    root = tree(tmp_path, {"train/cat": ["0.png"], "val/cat": ["1.png"]})
    with pytest.raises(data.DataError, match=r"train: 1 class folder\(s\) \['cat'\].*at least two"):
        data.build(root, None, None, SIZE)
    tree(tmp_path, {"train/dog": ["0.png"]})
    os.symlink(tmp_path / "train", tmp_path / "train" / "cat" / "loop")  # every image again, under cat
    with pytest.raises(data.DataError, match=r"reached twice"):
        data.build(root, None, None, SIZE)


def test_truncated_jpeg_is_found_before_training(tmp_path):
    """PIL's verify() passes a JPEG cut short; the check decodes it."""
    root = tree(tmp_path, {"train/cat": ["0.png"], "train/dog": ["0.png"], "val/cat": ["1.png"]})
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "val" / "cat" / "2.jpg", quality=90)
    raw = (tmp_path / "val" / "cat" / "2.jpg").read_bytes()
    (tmp_path / "val" / "cat" / "2.jpg").write_bytes(raw[: len(raw) * 6 // 10])
    with Image.open(tmp_path / "val" / "cat" / "2.jpg") as image:
        image.verify()  # passes: a header check is not enough
    with pytest.raises(data.DataError, match=r"val/cat/2.jpg: cannot read image .*truncated"):
        data.build(root, None, None, SIZE)


@pytest.mark.parametrize("bad", ["empty", "other"])
def test_class_folder_without_images_is_an_error(tmp_path, bad):
    root = tree(tmp_path, {"train/cat": ["0.png"], "train/dog": ["0.png"], f"train/{bad}": ["notes.txt", "._0.png"],
                           "val/cat": ["1.png"]})
    with pytest.raises(data.DataError) as e:
        data.build(root, None, None, SIZE)
    message = str(e.value)
    assert message.startswith(os.path.join(root, "train") + ": ") and repr(bad) in message and "'dog'" not in message
    assert "each class folder needs at least one image" in message and ".jpeg" in message and ".webp" in message


def test_train_without_class_folders_is_an_error(tmp_path):
    root = tree(tmp_path, {"train": [], "val/cat": ["0.png"]})
    with pytest.raises(data.DataError, match=r"train: 0 class folder\(s\)"):
        data.build(root, None, None, SIZE)


def test_eval_split_may_lack_a_class_but_not_hold_an_empty_one(tmp_path):
    root = tree(tmp_path, {"train/a": ["0.png"], "train/b": ["0.png"], "train/c": ["0.png"], "val/c": ["1.png"]})
    _, test, classes = data.build(root, None, None, SIZE)
    assert classes == 3 and paths(test, root) == [("val/c/1.png", 2)]  # the label comes from train's order
    os.makedirs(tmp_path / "val" / "a")
    with pytest.raises(data.DataError, match=r"val: no image in class folder\(s\) \['a'\]; each class folder needs"):
        data.build(root, None, None, SIZE)


def test_eval_split_without_images_is_an_error(tmp_path):
    root = tree(tmp_path, {"train/a": ["0.png"], "train/b": ["0.png"], "val": []})
    with pytest.raises(data.DataError, match=r"val: no images"):
        data.build(root, None, None, SIZE)


def _corrupt(path, how):
    raw = open(path, "rb").read()
    open(path, "wb").write({"garbage": b"not a png", "truncated": raw[: len(raw) // 2]}[how])


def test_unreadable_images_are_found_when_the_dataset_is_built(tmp_path):
    folder = make_task(tmp_path)
    _corrupt(os.path.join(folder, "images", "test_1_1.png"), "garbage")  # test.txt:4
    _corrupt(os.path.join(folder, "images", "train_2_1.png"), "truncated")  # train800val200.txt:10
    with pytest.raises(data.DataError) as e:
        data.build(str(tmp_path), "kitti", None, SIZE)
    first = re.escape(f"{folder}/train800val200.txt:10: cannot read image {folder}/images/train_2_1.png: ")
    assert re.match(first + r".+; 2 of the \d+ images cannot be read", str(e.value))


def test_unreadable_image_in_an_image_folder_eval_split(tmp_path):
    root = tree(tmp_path, {"train/a": ["0.png"], "train/b": ["0.png"], "val/a": ["1.png", "2.png"]})
    _corrupt(os.path.join(root, "val", "a", "2.png"), "garbage")
    with pytest.raises(data.DataError, match=r"val/a/2.png: cannot read image .*2.png: cannot identify image file.*; "
                                             r"1 of the 4 images cannot be read"):
        data.build(root, None, None, SIZE)


def test_each_set_names_its_split(tmp_path):
    make_task(tmp_path / "vtab")
    train, test, _ = data.build(str(tmp_path / "vtab"), "kitti", None, SIZE)
    assert (train.split, test.split) == ("train800val200", "test")
    assert data.build(str(tmp_path / "vtab"), "kitti", None, SIZE, "val200")[1].split == "val200"
    layout = {"train/a": ["0.png"], "train/b": ["0.png"], "test/a": ["1.png"], "holdout/a": ["2.png"]}
    root = tree(tmp_path / "folder", layout)
    train, test, _ = data.build(root, None, None, SIZE)
    assert (train.split, test.split) == ("train", "test")
    assert data.build(root, None, None, SIZE, "holdout")[1].split == "holdout"


def test_one_line_recovers_our_message_from_a_loader_worker(tmp_path):
    root = tree(tmp_path, {"train/a": ["0.png"], "train/b": ["0.png"], "val/a": ["1.png"]})
    train, _, _ = data.build(root, None, None, SIZE)  # the check passes; the file breaks afterwards
    bad = os.path.join(root, "train", "a", "0.png")
    _corrupt(bad, "garbage")
    with pytest.raises(data.DataError) as e:
        next(iter(DataLoader(train, batch_size=1, num_workers=1)))
    assert str(e.value).startswith("Caught DataError in DataLoader worker process 0.\n")
    assert data.one_line(e.value) == f"{bad}: cannot read image {bad}: cannot identify image file {bad!r}"
    assert data.one_line(data.DataError("x.txt:3: bad label: DataError: y")) == "x.txt:3: bad label: DataError: y"
    wrapped = ("Caught DataError in DataLoader worker process 2.\nOriginal Traceback (most recent call last):\n"
               '  File "data.py", line 1, in f\ngist_fast.training.data.DataError: x.txt:3: DataError: y\n')
    assert data.one_line(data.DataError(wrapped)) == "x.txt:3: DataError: y"
    assert data.one_line(KeyError("k")) == str(KeyError("k"))
