"""Datasets: VTAB-1K list files (METHODS §5), an ImageFolder tree, or the embedded digits.

Images are resized directly (bicubic) to the model's input and normalised with mean = std = 0.5, no
augmentation. PIL + numpy only (no torchvision transforms): the same pixels on every install.
Every bad input fails early with the file, and the line, it came from: build() also opens every
image's header before any training, so a corrupt file cannot stop a run hours in."""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gist_fast.training.recipe import VTAB_CLASSES

MEAN = STD = 0.5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
VTAB_TRAIN, VTAB_TEST = "train800val200.txt", "test.txt"
CHECK_THREADS = 32  # header reads wait on the disk (often a network one), not on the CPU


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the line."""


@dataclass
class Sample:
    path: str
    label: int
    where: str  # "list.txt:17", or the path itself for folders


def to_tensor(image, size: Tuple[int, int]) -> Tensor:
    """PIL image -> (3, H, W) float32, bicubic-resized to size = (H, W), normalised to [-1, 1]."""
    from PIL import Image

    image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - MEAN) / STD


class ImageList(Dataset):
    """(image, label) pairs read from disk on access; split names the set (a VTAB list file's stem
    such as 'test' or 'val200', an ImageFolder sub-folder such as 'train')."""

    def __init__(self, samples: Sequence[Sample], size: Tuple[int, int], split: str):
        self.samples, self.size, self.split = list(samples), tuple(size), split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        s = self.samples[i]
        try:
            with Image.open(s.path) as image:
                pixels = to_tensor(image, self.size)
        except Exception as e:  # PIL raises several types for truncated or foreign files
            raise DataError(f"{s.where}: cannot read image {s.path}: {e}") from e
        return pixels, s.label


class InMemory(Dataset):
    def __init__(self, images: Tensor, labels: Tensor, split: str):
        self.images, self.labels, self.split = images, labels, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def read_list(list_file: str, num_classes: int, source: str) -> List[Sample]:
    """Parse '<image path relative to the list's folder> <label>' lines; source says where
    num_classes came from, for the error message."""
    if not os.path.isfile(list_file):
        raise DataError(f"{list_file}: list file not found")
    folder, samples = os.path.dirname(list_file), []
    try:
        with open(list_file, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first path
            text = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not UTF-8 text (byte {e.start}); save the list as UTF-8") from None
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        where = f"{list_file}:{n}"
        parts = line.strip().rsplit(maxsplit=1)  # the path may hold spaces, the label may not
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}: expected '<image path> <integer label>', got {line.strip()!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} is outside 0..{num_classes - 1} "
                            f"(num_classes={num_classes} from {source})")
        path = os.path.join(folder, parts[0])
        if not os.path.isfile(path):
            raise DataError(f"{where}: image not found: {path}")
        samples.append(Sample(path, label, where))
    if not samples:
        raise DataError(f"{list_file}: the list is empty")
    return samples


def unreadable(path: str) -> Optional[str]:
    """PIL's reason why path cannot be decoded, or None. A full decode: a header check (verify()) passes
    JPEG, GIF, BMP and TIFF files cut short, which then fail mid-training; JPEGs decode at 1/8 scale (draft)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # a no-op for formats without DCT scaling
            image.load()
    except Exception as e:  # PIL raises several types for truncated or foreign files
        return str(e) or type(e).__name__
    return None


def check_images(*datasets: Dataset) -> None:
    """Raise on the first unreadable image in dataset order (deterministic however the threads
    finish), with how many there are in all; a file listed twice (val200 in train800val200) is read once."""
    samples = [s for d in datasets if isinstance(d, ImageList) for s in d.samples]
    paths = list(dict.fromkeys(s.path for s in samples))
    with ThreadPoolExecutor(min(CHECK_THREADS, max(len(paths), 1))) as pool:
        reasons = dict(zip(paths, pool.map(unreadable, paths)))
    bad = next((s for s in samples if reasons[s.path]), None)
    if bad is not None:
        count = sum(reason is not None for reason in reasons.values())
        raise DataError(f"{bad.where}: cannot read image {bad.path}: {reasons[bad.path]}; "
                        f"{count} of the {len(paths)} images cannot be read")


def one_line(error: BaseException) -> str:
    """Our one-line message from a DataError that a DataLoader worker re-raised: PyTorch's message
    is 'Caught DataError in DataLoader worker process N.' and the worker's traceback, whose last line
    is '<module>.DataError: <our message>'. str(error) for anything else."""
    text = str(error)
    last = text.rstrip("\n").rpartition("\n")[2]
    if not text.startswith("Caught ") or "DataError: " not in last:
        return text
    return last.partition("DataError: ")[2]  # the first: our message may itself quote 'DataError: '


def vtab(root: str, task: str, num_classes: Optional[int], size, split: Optional[str] = None):
    folder = os.path.join(root, task)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: VTAB task folder not found "
                        f"(expected ROOT/<task>/ with {VTAB_TRAIN} and {VTAB_TEST})")
    if num_classes is None and task not in VTAB_CLASSES:
        raise DataError(f"task {task!r} is not a VTAB-1K task; give --num-classes")
    source = "--num-classes" if num_classes is not None else f"the VTAB-1K table for {task}"
    num_classes = num_classes or VTAB_CLASSES[task]
    train, test = (ImageList(read_list(os.path.join(folder, name), num_classes, source), size, name[: -len(".txt")])
                   for name in (VTAB_TRAIN, f"{split}.txt" if split else VTAB_TEST))
    return train, test, num_classes


def is_image(name: str) -> bool:
    """An accepted extension in any case; hidden files (macOS's AppleDouble '._x.jpg') never are."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(folder: str) -> List[str]:
    """Images anywhere under folder, following symlinks, in torchvision's ImageFolder order (sorted
    walk, then sorted names): the same samples, and labels, as a torchvision run on the same tree. A
    folder reached twice (a symlink loop, or a link back up) is an error, not a source of copies."""
    seen, images = set(), []
    for d, subs, files in sorted(os.walk(folder, followlinks=True)):
        real = os.path.realpath(d)
        if real in seen or any(os.path.realpath(os.path.join(d, s)) in seen | {real} for s in subs):
            raise DataError(f"{d}: a symlinked folder is reached twice (a loop?); each image must be found once")
        seen.add(real)
        images += [os.path.join(d, f) for f in sorted(files) if is_image(f)]
    return images


def sub_folders(folder: str) -> List[str]:
    """The class folders. torchvision would make a hidden one (.ipynb_checkpoints) a class: refused instead."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    hidden = [n for n in names if n.startswith(".")]
    if hidden:
        raise DataError(f"{folder}: hidden folder(s) {hidden} would be classes; remove or rename them")
    return names


def scan(root: str, split: str, classes: List[str], size) -> ImageList:
    """root/split/<class>/**/<image>, labelled by the class's index in train's sorted class list;
    a class may be absent from an evaluation split, but a class folder with no image is an error."""
    split_dir, train_dir = os.path.join(root, split), os.path.join(root, "train")
    present = sub_folders(split_dir)
    extra = sorted(set(present) - set(classes))
    if extra:
        raise DataError(f"{split_dir}: class folders {extra} are not in {train_dir}")
    found = {c: find_images(os.path.join(split_dir, c)) for c in present}
    empty = [c for c in present if not found[c]]
    if empty:
        raise DataError(f"{split_dir}: no image in class folder(s) {empty}; each class folder needs at least one "
                        f"image with one of the extensions {' '.join(IMAGE_EXTENSIONS)} (any case; hidden files "
                        f"do not count): add images, or remove the folder")
    label = {c: i for i, c in enumerate(classes)}
    samples = [Sample(p, label[c], p) for c in present for p in found[c]]
    if not samples:
        raise DataError(f"{split_dir}: no images; expected {split_dir}/<class>/ folders named as in {train_dir}")
    return ImageList(samples, size, split)


def image_folder(root: str, num_classes: Optional[int], size, split: Optional[str] = None):
    """root/train/<class>/ and root/val/ (or root/test/, or root/<split>/) as torchvision's ImageFolder
    reads them: the classes are train's sub-folders (sorted), the images any file under a class
    folder, nested folders and symlinks included, with an accepted extension (any case). Unlike
    torchvision, hidden files are skipped and an evaluation split may lack a class."""
    train_dir = os.path.join(root, "train")
    if split and os.path.isdir(train_dir) and not os.path.isdir(os.path.join(root, split)):
        raise DataError(f"--split {split}: {os.path.join(root, split)} not found")
    split = next((d for d in ([split] if split else ["val", "test"]) if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or split is None:
        raise DataError(f"{root}: expected a VTAB root with --task, "
                        "or an ImageFolder tree with train/ and val/ (or test/)")
    classes = sub_folders(train_dir)
    if len(classes) < 2:
        raise DataError(f"{train_dir}: {len(classes)} class folder(s) {classes}; expected {train_dir}/<class>/ "
                        "folders of images, at least two")
    train = scan(root, "train", classes, size)  # before the count, so a stray folder is named
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"{train_dir}: {len(classes)} class folders but --num-classes {num_classes}")
    return train, scan(root, split, classes, size), len(classes)


def digits(size, train_images: int = 1000) -> Tuple[Dataset, Dataset, int]:
    """scikit-learn's 1,797 8x8 digits (shipped with it: no download), a fixed 1000 / 797 split."""
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the embedded digits need scikit-learn: pip install scikit-learn, or give --data") from None

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = torch.stack([to_tensor(Image.fromarray(p, mode="L"), size) for p in pixels])
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:train_images], order[train_images:]
    return InMemory(images[train], labels[train], "train"), InMemory(images[test], labels[test], "test"), 10


def build(data: Optional[str], task: Optional[str], num_classes: Optional[int], size,
          split: Optional[str] = None) -> Tuple[Dataset, Dataset, int]:
    """(train set, evaluation set, class count) for the configured data source; split names another
    evaluation set (a VTAB list such as 'val200', an ImageFolder sub-folder)."""
    if data is None:
        if num_classes not in (None, 10):
            raise DataError(f"the embedded digits have 10 classes, not --num-classes {num_classes}")
        if split not in (None, "test"):
            raise DataError(f"--split {split}: the embedded digits have the splits train and test")
        return digits(size)
    if task is not None:
        sets = vtab(data, task, num_classes, size, split)
    elif not os.path.isdir(data):
        raise DataError(f"{data}: data folder not found")
    else:
        sets = image_folder(data, num_classes, size, split)
    check_images(sets[0], sets[1])
    return sets
