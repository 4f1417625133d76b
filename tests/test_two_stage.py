import pytest
import torch
import torch.nn.functional as F

import gist_fast
from tiny import images, tiny_vit


def _loader(batches=2, batch=3, classes=5):
    g = torch.Generator().manual_seed(3)
    return [(images(batch, seed=10 + i), torch.randint(0, classes, (batch,), generator=g)) for i in range(batches)]


def _total_loss(model, loader, block, channel, t):
    """Σ CE over the loader with the stream entering blocks[block].norm2 scaled by (1 + t) on one channel."""
    def scale_stream(mod, args):
        a = args[0].clone()
        a[..., channel] = a[..., channel] * (1 + t)
        return (a,)

    # the stream feeds both norm2 and the residual: rescale it where it is made (the attention residual add)
    blk = model.blocks[block]
    original = blk.forward

    def forward(x, **kw):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        x = scale_stream(None, (x,))[0]
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    blk.forward = forward
    try:
        with torch.no_grad():
            return sum(F.cross_entropy(model(x).double(), y, reduction="sum") for x, y in loader).item()
    finally:
        blk.forward = original


def test_taylor_scores_match_finite_differences():
    model = gist_fast.patch(tiny_vit().double(), peft="ln", gist=False, verbose=False).eval()
    loader = [(x.double(), y) for x, y in _loader()]
    scores = gist_fast.taylor_importance(model, loader)
    assert scores.shape == (2, 48) and (scores >= 0).all()
    n_images, h = 6, 1e-5
    for block, channel in [(0, 3), (1, 17), (1, 40)]:
        fd = (_total_loss(model, loader, block, channel, h) - _total_loss(model, loader, block, channel, -h)) / (2 * h)
        assert abs(fd) / n_images == pytest.approx(scores[block, channel].item(), rel=1e-4, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_select_channels_and_stage_two():
    scores = torch.rand(2, 48, generator=torch.Generator().manual_seed(0))
    picked = gist_fast.select_channels(scores, k=6)
    assert picked.shape == (2, 6) and torch.equal(picked, picked.sort(1).values)
    for row, idx in zip(scores, picked):
        assert set(idx.tolist()) == set(row.topk(6).indices.tolist())
    model = gist_fast.patch(tiny_vit(), peft="channels", gist=False, channels=picked, verbose=False)
    assert torch.equal(model.blocks[1].channel_linear.channels, picked[1])
    with pytest.raises(ValueError, match="k must be in"):
        gist_fast.select_channels(scores, k=49)
