"""Datasets: VTAB-1K list files (METHODS §5), an ImageFolder tree, or the embedded digits.

Images are resized directly (bicubic) to the model's input and normalised with mean = std = 0.5, no
augmentation. PIL + numpy only (no torchvision transforms): the same pixels on every install.
Every bad input fails early with the file, and the line, it came from."""
import os
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
    """(image, label) pairs read from disk on access."""

    def __init__(self, samples: Sequence[Sample], size: Tuple[int, int]):
        self.samples, self.size = list(samples), tuple(size)

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
    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

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
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
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


def vtab(root: str, task: str, num_classes: Optional[int], size, split: Optional[str] = None):
    folder = os.path.join(root, task)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: VTAB task folder not found (expected ROOT/<task>/ with {VTAB_TRAIN} and {VTAB_TEST})")
    if num_classes is None and task not in VTAB_CLASSES:
        raise DataError(f"task {task!r} is not a VTAB-1K task; give --num-classes")
    source = "--num-classes" if num_classes is not None else f"the VTAB-1K table for {task}"
    num_classes = num_classes or VTAB_CLASSES[task]
    train = read_list(os.path.join(folder, VTAB_TRAIN), num_classes, source)
    test = read_list(os.path.join(folder, f"{split}.txt" if split else VTAB_TEST), num_classes, source)
    return ImageList(train, size), ImageList(test, size), num_classes


def image_folder(root: str, num_classes: Optional[int], size, split: Optional[str] = None):
    """root/train/<class>/*.png and root/val/ (or root/test/, or root/<split>/) with the same class folders."""
    train_dir = os.path.join(root, "train")
    eval_dir = next((os.path.join(root, d) for d in ([split] if split else ["val", "test"])
                     if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or eval_dir is None:
        raise DataError(f"{root}: expected a VTAB root with --task, or an ImageFolder tree with train/ and val/ (or test/)")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"{train_dir}: {len(classes)} class folders but --num-classes {num_classes}")

    def scan(split_dir):
        extra = sorted(set(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))) - set(classes))
        if extra:
            raise DataError(f"{split_dir}: class folders {extra} are not in {train_dir}")
        samples = [Sample(os.path.join(split_dir, c, f), i, os.path.join(split_dir, c, f))
                   for i, c in enumerate(classes) if os.path.isdir(os.path.join(split_dir, c))
                   for f in sorted(os.listdir(os.path.join(split_dir, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not samples:
            raise DataError(f"{split_dir}: no images found")
        return ImageList(samples, size)

    return scan(train_dir), scan(eval_dir), len(classes)


def digits(size, train_images: int = 1000) -> Tuple[Dataset, Dataset, int]:
    """scikit-learn's 1,797 8x8 digits (shipped with it: no download), a fixed 1000 / 797 split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = torch.stack([to_tensor(Image.fromarray(p, mode="L"), size) for p in pixels])
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:train_images], order[train_images:]
    return InMemory(images[train], labels[train]), InMemory(images[test], labels[test]), 10


def build(data: Optional[str], task: Optional[str], num_classes: Optional[int], size,
          split: Optional[str] = None) -> Tuple[Dataset, Dataset, int]:
    """(train set, evaluation set, class count) for the configured data source; split names another
    evaluation set (a VTAB list such as 'val200', an ImageFolder sub-folder)."""
    if data is None:
        if num_classes not in (None, 10):
            raise DataError(f"the embedded digits have 10 classes, not --num-classes {num_classes}")
        return digits(size)
    if task is not None:
        return vtab(data, task, num_classes, size, split)
    if not os.path.isdir(data):
        raise DataError(f"{data}: data folder not found")
    return image_folder(data, num_classes, size, split)
