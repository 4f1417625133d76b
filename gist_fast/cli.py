"""`gist-fast` (or `python -m gist_fast`): train, eval, vtab, bench.

    gist-fast train                                   # GIST on the embedded digits, about 10 s on two CPU cores
    gist-fast train --framework idat --data ROOT --task cifar --pretrained
    torchrun --nproc_per_node 4 -m gist_fast train --data ROOT --task dtd --pretrained
    gist-fast eval runs/train/best.pt
    gist-fast train --peft vpt --prompts 200 --data ROOT --task dtd --pretrained   # GIST over VPT-shallow
    gist-fast vtab --data ROOT --pretrained --output runs/vtab
    gist-fast vtab --data ROOT --pretrained --peft adapter,vpt,lora,ssf --output runs/kinds   # kinds x tasks

A mistake in the input (an option value, a model, a file) ends with one line naming it, exit status 2.
"""
import argparse
import ast
import json
import os
import sys
from typing import List, Optional

DESCRIPTION = "Fused-kernel GIST / iDAT / two-stage fine-tuning of timm Vision Transformers."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and no abbreviated options (`vtab --task` is not `--tasks`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _kwargs(text: str) -> dict:
    """'img_size=32,depth=6' -> {'img_size': 32, 'depth': 6} (values as Python literals when they parse)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _size(text: str) -> str:
    """--memory-budget: checked here so that the error names the option; kept as written."""
    from gist_fast.memory import parse_bytes

    try:
        parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_train_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    _add_method_options(p, sweep)
    if sweep:
        d = p.add_argument_group("data")
        d.add_argument("--data", help="the VTAB-1K root holding the task folders (METHODS §5)")
    else:
        d = p.add_argument_group("data (none: the embedded 8x8 digits, 1000 train / 797 test)")
        d.add_argument("--data", help="a VTAB-1K root (with --task) or an ImageFolder tree (train/ and val/ or test/)")
    if not sweep:  # the sweep names its tasks with --tasks, and each VTAB task has its own class count
        d.add_argument("--task", help="VTAB-1K task folder; also picks its lr / weight decay / drop-path")
        d.add_argument("--num-classes", type=int, help="class count (VTAB: from the task; folders: from train/)")
    _add_recipe_and_run_options(p, sweep)


def _kinds(text: str) -> List[str]:
    """vtab --peft: 'adapter,vpt,lora' -> the kinds, each one of gist_fast.peft.TUNABLE, each once."""
    from gist_fast.peft import TUNABLE

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TUNABLE]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or repr(text)}: name kinds separated by commas, "
                                         f"from {', '.join(TUNABLE)}")
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named twice")
    return kinds


def _add_method_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from gist_fast.peft import KINDS, TUNABLE
    from gist_fast.training.recipe import FRAMEWORKS, FUSED_MODES

    m = p.add_argument_group("method")
    m.add_argument("--framework", choices=FRAMEWORKS, help="gist (default): adapter + Gist token + GistLoss; adapter: "
                   "the same without the token; idat: a teacher trained jointly; two-stage: LayerNorms, then Taylor-"
                   "selected channels; linear: head only")
    kinds = ("adapter (gist's and adapter's own), seq-adapter (idat's), adaptformer, vpt (VPT-shallow prompts), lora "
             "(the GIST authors' per-head LoRA on q and v), qkv-lora (Hu et al.'s LoRA on the qkv Linear, HF PEFT's "
             "layout), ssf (scale and shift)")
    if sweep:
        m.add_argument("--peft", type=_kinds, metavar="KIND[,KIND...]",
                       help=f"sweep these PEFT kinds (with the Gist token under --framework gist, without under "
                       f"adapter) into one table of kinds x tasks (default: the framework's own kind, the per-task "
                       f"table). Kinds: {kinds}")
    else:
        m.add_argument("--peft", choices=TUNABLE, metavar="KIND",
                       help=f"the PEFT kind of gist/adapter/idat (gist: with the Gist token, adapter: without): "
                       f"{kinds}")
    m.add_argument("--rank", type=int, metavar="R",
                   help="bottleneck of the adapter kinds, rank r of lora and qkv-lora (4)")
    m.add_argument("--prompts", type=int, metavar="N",
                   help=f"vpt: the number N of prompt tokens ({KINDS['vpt'].prompts}, the authors' VTAB script)")
    m.add_argument("--alpha", type=float, help=f"lora: alpha in q += alpha * up(down(q)), the same for v "
                   f"({KINDS['lora'].alpha:g}, no 1/r factor); qkv-lora: Hu et al.'s alpha, the update "
                   f"(alpha / r) * B A h ({KINDS['qkv-lora'].alpha:g})")
    m.add_argument("--gist-temperature", type=float, metavar="T",
                   help="gist: GistLoss temperature T: its two KL terms compare softmax(z / T) of the CLS and the Gist "
                   "logits, no T^2 factor (3, the GIST code's; the authors' later gistb code: 10)")
    m.add_argument("--gist-weight", type=float, metavar="LAMBDA",
                   help="gist: GistLoss lambda, the weight of each of the two KL terms, CE(cls) + 0.5 CE(gist) + "
                   "lambda (KL(cls||gist) + KL(gist||cls)) (0.75; GistLoss(kl_weight=); the 0.5 stays)")
    m.add_argument("--distill-kind", choices=("kl", "mse"), help="iDAT distillation term (kl, T = 5)")
    m.add_argument("--stage1-epochs", type=int, help="two-stage: LayerNorm epochs (a tenth of the run)")
    m.add_argument("--channels-k", type=int, help="two-stage: channels kept per block (D/8: 96 for ViT-B)")
    m.add_argument("--fused", choices=FUSED_MODES, help="fused ops: auto (default), on, off (plain-PyTorch reference)")

    mo = p.add_argument_group("model")
    mo.add_argument("--model", help="timm model name (as the authors' code: vit_base_patch16_224.augreg_in21k; "
                    "two-stage: vit_base_patch16_224.orig_in21k; a 4-block ViT-Tiny on the embedded digits)")
    mo.add_argument("--model-kwargs", type=_kwargs,
                    help="timm create_model overrides, e.g. img_size=32,patch_size=8,depth=2")
    mo.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (downloads)")
    mo.add_argument("--pretrained-file", help="a local timm checkpoint (.npz, .safetensors, .pth) for the backbone")
    mo.add_argument("--teacher", help="iDAT teacher (vit_small_patch16_224.augreg_in21k; a small ViT on digits)")
    mo.add_argument("--teacher-kwargs", type=_kwargs, help="timm overrides for the teacher")
    mo.add_argument("--teacher-pretrained-file", help="a local timm checkpoint for the teacher")


def _add_recipe_and_run_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from gist_fast.training.recipe import AMP_MODES, MEMORY_MODES

    r = p.add_argument_group("recipe (defaults: the authors', METHODS §4)")
    r.add_argument("--epochs", type=int, help="cosine epochs (100; 8 on digits)")
    r.add_argument("--cooldown-epochs", type=int, help="epochs at --min-lr after the cosine (10; 0 on digits)")
    r.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs from --warmup-lr (10; 1 on digits)")
    r.add_argument("--warmup-lr", type=float, help="(1e-7)")
    r.add_argument("--min-lr", type=float, help="(1e-8)")
    r.add_argument("--lr", type=float, help="(per task; 5e-3)")
    r.add_argument("--weight-decay", type=float, help="on tensors with ndim >= 2 (per task; 5e-5)")
    r.add_argument("--drop-path", type=float, help="(per task; 0)")
    r.add_argument("--batch-size", type=int, help="global batch, split across processes (64)")
    r.add_argument("--seed", type=int, help="(42)")
    r.add_argument("--amp", choices=AMP_MODES, help="mixed precision (bf16 on a GPU that has it, none on CPU)")

    x = p.add_argument_group("run")
    x.add_argument("--device", help="cpu, cuda, cuda:1 (a GPU when there is one)")
    x.add_argument("--workers", type=int, help="data-loader processes (0 on digits, else up to 4)")
    x.add_argument("--eval-every", type=int, help="evaluate every N epochs (1) and always after the last")
    x.add_argument("--output", help="a folder per task (per kind and task with --peft K1,K2) and the table "
                   "(runs/vtab)" if sweep else
                   "folder for log.jsonl, last.pt, best.pt, result.json (runs/train)")
    x.add_argument("--stop-after-steps", type=int, help="stop after N steps with a resumable checkpoint")
    x.add_argument("--memory", choices=MEMORY_MODES, help="the block's memory mode (gist_fast.patch(memory=)): auto "
                   "(default: lean on CUDA, none on CPU), lean, min, none (the eager block)")
    x.add_argument("--memory-budget", type=_size, help="e.g. 16GiB: run each batch's backward in the largest "
                   "micro-batches that fit (gist_fast.fit_micro_batch) and accumulate: the whole batch's update")
    x.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    x.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds an earlier run "
                   "(its checkpoints, log and result are replaced)")


def parser() -> argparse.ArgumentParser:
    from gist_fast import __version__

    p = _Parser(prog="gist-fast", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"gist-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune a timm ViT (GIST, adapter, iDAT, two-stage, linear)",
                       argument_default=argparse.SUPPRESS, description="Options left out take the authors' recipe "
                       "(METHODS §4), the task's table row, or the embedded digits defaults.")
    _add_train_options(t)
    t.add_argument("--resume", help="a last.pt to continue exactly, in its own folder (its own configuration; "
                   "only run options may change)")
    v = sub.add_parser("vtab", help="train on every VTAB-1K task (or --tasks), with every PEFT kind of --peft, and "
                       "tabulate the means; the same command again continues an interrupted sweep",
                       argument_default=argparse.SUPPRESS)
    _add_train_options(v, sweep=True)
    v.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], help="comma-separated task list (all 19)")
    e = sub.add_parser("eval", help="accuracy of a checkpoint (best.pt or last.pt) on a split")
    e.add_argument("checkpoint")
    e.add_argument("--split", help="what to evaluate: the run's own evaluation set (default: VTAB test.txt, an "
                   "ImageFolder's val/ else test/), train, a VTAB list name (val200) or an ImageFolder sub-folder")
    for name in ("--data", "--task", "--device"):
        e.add_argument(name, help="override the checkpoint's")
    e.add_argument("--workers", type=int)
    e.add_argument("--batch-size", type=int)
    sub.add_parser("bench", help="benchmarks (gist_fast.bench; options after 'bench' are passed on)", add_help=False)
    return p


def _train_config(given: dict, kinds: Optional[List[str]] = None):
    """The run's TrainConfig from the options set on the command line (kinds: a sweep's --peft list)."""
    from gist_fast.training.recipe import TrainConfig, check_framework_options

    framework = given.get("framework", TrainConfig.framework)
    check_framework_options(framework, {**given, **({"peft": kinds} if kinds else {})}, kinds)
    return TrainConfig(**given)


def _run(command: str, args: dict) -> None:
    from gist_fast.training import checkpoint, distributed, loop, recipe, vtab

    overwrite = args.pop("overwrite", False)
    if command == "train":
        resume = args.pop("resume", None)
        if resume:
            saved = checkpoint.load(resume, resumable=True)["config"]
            cfg = recipe.for_resume(saved, args, os.path.dirname(os.path.abspath(resume)))
        else:
            cfg = _train_config(args)
        result = loop.train(cfg, resume, overwrite)
        if distributed.is_main_process():
            print(f"done: last accuracy {result['last_acc']:.2f}%  best {result['best_acc']:.2f}%  "
                  f"({result['trainable']:,} trainable parameters, {result['wall_s']:.0f} s)")
    elif command == "vtab":
        tasks, kinds = args.pop("tasks", None), args.pop("peft", None)
        if "data" not in args:
            raise ValueError("gist-fast vtab needs --data ROOT (the VTAB-1K root)")
        args.setdefault("output", "runs/vtab")
        print(vtab.run(_train_config(args, kinds), tasks, overwrite, kinds)["table"])
    elif command == "eval":
        path, split = args.pop("checkpoint"), args.pop("split")
        print(json.dumps(loop.evaluate_checkpoint(path, split, **args)))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from gist_fast import bench  # another module's own command line

        return bench.main(argv[1:]) or 0
    try:
        args = vars(parser().parse_args(argv))
    except SystemExit as done:  # --help, --version, or an argparse error (already printed, one line)
        return done.code or 0
    command = args.pop("command")

    from gist_fast.training import data, distributed, loop

    try:
        _run(command, args)
    except loop.Stopped as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except (data.DataError, OSError, ValueError) as e:  # the user's input or files: one line, no traceback
        print(f"gist-fast {command}: error: {data.one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (the loop itself saves and stops on a signal)
        print(f"gist-fast {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0
