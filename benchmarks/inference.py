"""Inference benchmark of gist_fast.merge: eval-mode forward (no_grad) of the unpatched timm model, and of each
mergeable kind patched (unmerged: patch()'s defaults) and merged, on the same weights and batch, through the
benchmark harness (gist_fast.bench_harness): rows appended to <out>/results.csv, inference.md redrawn
(gist_fast.bench_report).

    python benchmarks/inference.py [--device cpu|cuda] [--model NAME] [--batch B] [--dtype fp32|bf16]
        [--kinds lora,qkv-lora,ssf] [--gist 1,0] [--threads N] [--rep-ms 300] [--img-size 224] [--out DIR]

Defaults: CUDA vit_base_patch16_224, batch 64, bf16 (the model cast); CPU vit_small_patch16_224, batch 8, fp32.
Per --gist setting (1: every patched model carries the Gist token, as patch() does by default; 0: none), the
functions timed side by side (CPU: interleaved rounds, CUDA: do_bench), each one forward of the batch:
    timm             the model as timm builds it
    <kind>           gist_fast.patch(peft=<kind>, gist=...) with random non-zero PEFT tensors
    <kind>_merged    the same after gist_fast.merge
Rows: op "inference", mode "forward", metrics ms and img_per_s (x = batch), and max_abs_dlogits (the largest
|merged - unmerged| logit on the batch). Expected: CPU about 2 minutes on 2 cores with --threads 1 (4.5 with
--rep-ms 15000, the committed run's ~19 rounds).
"""
import copy
import sys
from typing import Dict, List, Optional

import torch

import gist_fast
from gist_fast import bench_harness as harness
from gist_fast import bench_report
from gist_fast.bench_harness import Row, make_row
from gist_fast.peft import KINDS

OP = bench_report.INFERENCE_OP
MERGEABLE = tuple(k for k, kind in KINDS.items() if kind.fold is not None)
DEFAULTS = {"cuda": ("vit_base_patch16_224", 64, "bf16"), "cpu": ("vit_small_patch16_224", 8, "fp32")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parse(argv: Optional[List[str]]):
    p = harness.Parser(prog="inference.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--model", default=None, help="timm model name (default vit_base_patch16_224 on CUDA, "
                   "vit_small_patch16_224 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default 64 CUDA, 8 CPU)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="the model's dtype (default bf16 CUDA, "
                   "fp32 CPU)")
    p.add_argument("--kinds", default=",".join(MERGEABLE), help=f"comma list of {','.join(MERGEABLE)}")
    p.add_argument("--gist", default="1,0", help="comma list of 1 (with the Gist token) and 0 (without)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--rep-ms", type=float, default=300.0, help="timed window per function (ms)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (smaller for smoke tests)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>); rows are "
                   "appended to its results.csv")
    return p.parse_args(argv)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every PEFT tensor non-zero (the zero-initialised LoRA factor too), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p))


def models(base: torch.nn.Module, kinds: List[str], gist: bool, seed: int) -> Dict[str, torch.nn.Module]:
    """timm, then each kind patched and merged, all from the same weights, in eval mode."""
    out = {"timm": base}
    for kind in kinds:
        patched = gist_fast.patch(copy.deepcopy(base), peft=kind, gist=gist, verbose=False)
        _randomise(patched, seed)
        out[kind] = patched.eval()
        out[f"{kind}_merged"] = gist_fast.merge(copy.deepcopy(patched)).eval()
    return out


def bench(args, device: torch.device, emit) -> None:
    import timm

    model, batch, dtype = (getattr(args, k) or d for k, d in zip(("model", "batch", "dtype"),
                                                                  DEFAULTS[device.type]))
    kinds = [k.strip() for k in args.kinds.split(",")]
    unknown = [k for k in kinds if k not in MERGEABLE]
    if unknown:
        raise ValueError(f"--kinds {','.join(unknown)}: choose from {','.join(MERGEABLE)}")
    gists = [g.strip() for g in args.gist.split(",")]
    if not gists or any(g not in ("1", "0") for g in gists):
        raise ValueError(f"--gist {args.gist}: expected a comma list of 1 and 0")
    if batch < 1 or args.img_size < 16:
        raise ValueError("--batch must be >= 1 and --img-size >= 16")
    env = harness.environment(device)
    torch.manual_seed(args.seed)
    base = timm.create_model(model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    base = base.to(device=device, dtype=DTYPES[dtype]).eval()
    images = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(args.seed))
    images = images.to(device=device, dtype=DTYPES[dtype])
    for gist in gists:
        config = {"model": model, "dtype": dtype, "img": args.img_size, "gist": gist}
        nets = models(base, kinds, gist == "1", args.seed + 1)

        def forward(net):
            def call():
                with torch.no_grad():
                    return net(images)
            return call

        fns = {name: forward(net) for name, net in nets.items()}
        timings = harness.measure(fns, device, rep_ms=args.rep_ms, warmup=3)
        rows: List[Row] = []
        for name, t in timings.items():
            rows += [make_row(env, OP, name, "forward", "ms", "batch", batch, config, t),
                     make_row(env, OP, name, "forward", "img_per_s", "batch", batch, config, t.per_second(batch),
                              t.method)]
            print(f"{model} gist={gist} {name:16s} {t.p50:9.2f} ms", flush=True)
        for kind in kinds:
            d = (fns[f"{kind}_merged"]().double() - fns[kind]().double()).abs().max().item()
            rows.append(make_row(env, OP, f"{kind}_merged", "forward", "max_abs_dlogits", "batch", batch, config, d,
                                 "max |merged - unmerged| logit on the batch"))
        emit(rows)


def main(argv: Optional[List[str]] = None) -> int:
    """0 when done; 2 (one line on stderr) on a bad option or --out."""
    return harness.run_cli("inference.py", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    args = _parse(argv)
    device = harness.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected >= 1")
        torch.set_num_threads(args.threads)
    out = args.out or harness.results_dir(device)
    _, emit = bench_report.results_sink(out)
    written: List[str] = []
    bench(args, device, lambda rows: written.extend(emit(rows)))
    print("wrote " + ", ".join(dict.fromkeys(written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
