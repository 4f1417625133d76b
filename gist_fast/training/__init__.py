"""The `gist-fast train / eval / vtab` machinery: the authors' recipe (recipe.py), data (data.py),
models per framework (models.py), atomic resumable checkpoints (checkpoint.py), DDP helpers
(distributed.py), the epoch loop (loop.py) and the VTAB-1K sweep (vtab.py)."""
from gist_fast.training.loop import evaluate_checkpoint, train
from gist_fast.training.recipe import TrainConfig

__all__ = ["TrainConfig", "train", "evaluate_checkpoint"]
