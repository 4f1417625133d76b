"""nn.Module losses over the fused functional ops (defaults are the authors')."""
from typing import Tuple, Union

from torch import Tensor, nn

from gist_fast import ops
from gist_fast.patch import GistOutput


class GistLoss(nn.Module):
    """L = CE(z_cls, y) + gist_weight CE(z_gist, y)
    + kl_weight (KL(σ_T(z_cls)||σ_T(z_gist)) + KL(σ_T(z_gist)||σ_T(z_cls))).

    Takes a GistOutput (a gist-patched model's train-mode output) or a (logits, gist_logits) pair.
    Nothing is detached: every term sends gradients into both logit sets."""

    def __init__(self, gist_weight: float = 0.5, kl_weight: float = 0.75, temperature: float = 3.0,
                 ignore_index: int = -100, reduction: str = "mean", fused: bool = True):
        super().__init__()
        ops.losses.check_options(temperature, reduction)
        self.gist_weight, self.kl_weight, self.temperature = gist_weight, kl_weight, temperature
        self.ignore_index, self.reduction, self.fused = ignore_index, reduction, fused

    def forward(self, output: Union[GistOutput, Tuple[Tensor, Tensor]], target: Tensor) -> Tensor:
        if isinstance(output, Tensor) or len(output) != 2:
            raise TypeError("GistLoss needs (logits, gist_logits): call the gist-patched model in train mode "
                            "(eval mode returns logits only) or use CrossEntropyLoss for gist=False")
        return ops.gist_loss(output[0], output[1], target, self.gist_weight, self.kl_weight, self.temperature,
                             self.ignore_index, self.reduction, self.fused)

    def extra_repr(self) -> str:
        return f"gist_weight={self.gist_weight}, kl_weight={self.kl_weight}, temperature={self.temperature}"


class DistillLoss(nn.Module):
    """iDAT: CE(z_S, y) + CE(z_T, y) + D(z_S, z_T), D = KL(σ_T(z_T)||σ_T(z_S)) ("kl", T = 5, batch mean)
    or the mean squared logit gap ("mse", the authors' released script); D updates both models."""

    def __init__(self, kind: str = "kl", temperature: float = 5.0, ignore_index: int = -100,
                 reduction: str = "mean", fused: bool = True):
        super().__init__()
        if kind not in ops.losses.DISTILL_KINDS:
            raise ValueError(f"distill kind must be one of {ops.losses.DISTILL_KINDS}, got {kind!r}")
        ops.losses.check_options(temperature, reduction)
        self.kind, self.temperature, self.ignore_index, self.reduction, self.fused = (
            kind, temperature, ignore_index, reduction, fused)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return ops.distill_loss(student, teacher, target, self.kind, self.temperature, self.ignore_index,
                                self.reduction, self.fused)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}"
