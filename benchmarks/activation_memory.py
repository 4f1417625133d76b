"""Saved activations per image (gist_fast.activation_bytes) of a timm ViT for eager, timm gradient
checkpointing, memory="lean" and memory="min", under bf16 autocast and as a bf16 model: rows of op
"saved_activations" appended to <out>/results.csv through the benchmark harness, and
activation_memory.md redrawn (gist_fast.bench_report). CPU is enough: the accounting uses saved-tensor
hooks, no allocator, so the numbers hold on any device.

    python benchmarks/activation_memory.py [--model vit_base_patch16_224] [--out benchmarks/results/cpu]
"""
import copy
import os
import sys
from typing import List, Optional

import timm
import torch

import gist_fast
from gist_fast import bench_harness as harness
from gist_fast.bench_report import results_sink

VARIANTS = (("eager", dict(fused=False), False), ("checkpoint", dict(fused=False), True),
            ("lean", dict(memory="lean"), False), ("min", dict(memory="min"), False))
BATCH = 4


def rows(name: str, env) -> List[harness.Row]:
    base = timm.create_model(name, pretrained=False, num_classes=100)
    x = torch.randn(BATCH, 3, 224, 224)
    out = []
    for label, kwargs, checkpointing in VARIANTS:
        for precision in ("bf16-autocast", "bf16-model"):
            model = gist_fast.patch(copy.deepcopy(base), verbose=False, **kwargs).train()
            if checkpointing:
                model.set_grad_checkpointing()
            if precision == "bf16-model":
                report = gist_fast.activation_bytes(model.to(torch.bfloat16), x.bfloat16())
            else:
                report = gist_fast.activation_bytes(model, x, autocast_dtype=torch.bfloat16)
            out.append(harness.make_row(env, "saved_activations", label, "train", "MB_per_img", "batch", BATCH,
                                        {"model": name, "precision": precision}, report.per_image_mb,
                                        "saved-tensor hooks (gist_fast.activation_bytes)"))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    return harness.run_cli("activation_memory.py", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    p = harness.Parser(prog="activation_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = p.parse_args(argv)
    if not timm.is_model(args.model):
        raise ValueError(f"--model {args.model}: not a timm model")
    _, emit = results_sink(args.out)
    print("\n".join(emit(rows(args.model, harness.environment(torch.device("cpu"))))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
