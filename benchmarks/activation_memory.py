"""Saved activations per image (gist_fast.activation_bytes) for eager / timm checkpointing / lean /
min on a timm ViT, under bf16 autocast and as a bf16 model. CPU is enough (no allocator needed).

    python benchmarks/activation_memory.py [vit_base_patch16_224]
"""
import copy
import sys

import timm
import torch

import gist_fast


def main(name: str = "vit_base_patch16_224") -> None:
    base = timm.create_model(name, pretrained=False, num_classes=100)
    x = torch.randn(4, 3, 224, 224)
    variants = [("eager", dict(fused=False), False), ("checkpoint", dict(fused=False), True),
                ("lean", dict(memory="lean"), False), ("min", dict(memory="min"), False)]
    print(f"| {name} | bf16 autocast MB/img | % eager | bf16 model MB/img | % eager |\n|---|---:|---:|---:|---:|")
    ref = {}
    for label, kw, ckpt in variants:
        cells = []
        for bf16_model in (False, True):
            m = gist_fast.patch(copy.deepcopy(base), verbose=False, **kw).train()
            if ckpt:
                m.set_grad_checkpointing()
            if bf16_model:
                rep = gist_fast.activation_bytes(m.to(torch.bfloat16), x.bfloat16())
            else:
                rep = gist_fast.activation_bytes(m, x, autocast_dtype=torch.bfloat16)
            ref.setdefault(bf16_model, rep.per_image_mb)
            cells += [f"{rep.per_image_mb:.2f}", f"{100 * rep.per_image_mb / ref[bf16_model]:.0f}%"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
