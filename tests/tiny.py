"""Tiny timm ViTs for fast CPU tests."""
import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(num_classes=5, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=num_classes)
    args.update(kw)
    return VisionTransformer(**args)


def images(batch=3, seed=1, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
