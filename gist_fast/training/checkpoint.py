"""Atomic checkpoint files and the RNG states that make a resumed run continue exactly."""
import os
import random
import tempfile
from typing import Any, Dict, List

import numpy as np
import torch

from gist_fast.training.recipe import TrainConfig

TRAIN_CONFIG_FIELDS = set(TrainConfig.__dataclass_fields__)

RUN_FILES = ("last.pt", "best.pt", "result.json")  # what a run trained; its log.jsonl alone holds nothing to keep


def earlier_run(folder: str) -> List[str]:
    """The files of an earlier run in folder (none: a fresh folder, or one whose run stopped before saving)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))]


def clear_run(folder: str) -> None:
    """Remove an earlier run's files (--overwrite), so that none of them (best.pt) outlives it."""
    for path in (os.path.join(folder, f) for f in RUN_FILES + ("log.jsonl",)):
        if os.path.exists(path):
            os.unlink(path)


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace: a crash at any point
    leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder


def load(path: str, resumable: bool = False) -> Dict[str, Any]:
    """A `gist-fast train` checkpoint (resumable: a last.pt, which holds the optimizer and RNG states)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch each raise their own types for a foreign file
        raise ValueError(f"{path}: not a gist-fast train checkpoint (cannot be read: {type(e).__name__})") from None
    student, config = (ckpt.get("student"), ckpt.get("config")) if isinstance(ckpt, dict) else (None, None)
    if not (isinstance(student, dict) and {"gist_fast_config", "state_dict"} <= student.keys()
            and isinstance(config, dict) and config.keys() <= TRAIN_CONFIG_FIELDS):
        raise ValueError(f"{path}: not a gist-fast train checkpoint (expected 'student' with a patch configuration "
                         "and 'config' with train options)")
    if resumable and "optimizers" not in ckpt:
        raise ValueError(f"{path}: a best-accuracy checkpoint (for gist-fast eval) cannot be resumed; resume from "
                         f"{os.path.join(os.path.dirname(path) or '.', 'last.pt')}")
    return ckpt


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
