"""Two-stage paradigm (a reconstruction: no code was released): first-order Taylor channel importance
at each block's norm2 input, and the top-K selection that patch(peft="channels") takes."""
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.enable_grad()
def taylor_importance(model: nn.Module, loader: Iterable[Tuple[Tensor, Tensor]],
                      device: Optional[torch.device] = None, max_batches: Optional[int] = None) -> Tensor:
    """I[l, c] = | (1/num_images) Σ_images Σ_tokens g[n, t, c] a[n, t, c] |, (blocks, D) fp32.

    a is the residual stream entering block l's norm2, g = ∂CE_n/∂a for each image's own
    cross-entropy (summed over the batch, so the score does not depend on the batch size).
    The model runs in eval mode (no dropout) and its parameters' gradients are left untouched."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    blocks = list(model.blocks)
    totals = torch.zeros(len(blocks), model.embed_dim, dtype=torch.float64, device=device)
    streams = []
    hooks = [b.norm2.register_forward_pre_hook(lambda mod, args: streams.append(args[0])) for b in blocks]
    images_seen = 0
    try:
        for step, (images, target) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            streams.clear()
            images = images.to(device).requires_grad_(True)  # so the stream carries gradients with a frozen backbone
            logits = model(images)
            loss = F.cross_entropy(logits.float(), target.to(device), reduction="sum")
            grads = torch.autograd.grad(loss, streams)
            for i, (a, g) in enumerate(zip(streams, grads)):
                totals[i] += (a.detach().double() * g.double()).sum(dim=(0, 1))
            images_seen += images.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if images_seen == 0:
        raise ValueError("taylor_importance got an empty loader")
    return (totals / images_seen).abs().float()


def select_channels(scores: Tensor, k: int = 96) -> Tensor:
    """The k highest-scoring channels of each block, ascending: a (blocks, k) LongTensor."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (blocks, channels), got {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    return scores.topk(k, dim=1).indices.sort(dim=1).values
