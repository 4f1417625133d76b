"""Memory-lean forward/backward for the blocks of the kinds written as Steps (gist_fast.peft.blocks): vpt, lora,
qkv-lora and ssf.

The forward runs the kind's own steps without a graph and saves, per block:

    memory="lean"  the block input x and u = fc1(norm2 x1), the MLP pre-activation
    memory="min"   x only
    memory="auto"  "lean" on CUDA; on CPU the eager block (compute-bound there: recomputation only costs time)

The backward replays the same steps from x under autograd, one block at a time (with the forward's RNG state,
so DropPath and dropout draw the same masks, and its autocast state): in "lean" the MLP after fc1 is replayed
from the saved u and fc1's input gradient is one matmul, in "min" fc1 is replayed too. The replay is the eager
forward itself, so outputs and gradients are those of the eager block (bit for bit on CPU): the PEFT tensors,
any backbone weight a user unfroze, and x get their gradients from autograd. Per call, only torch.compile
tracing takes the eager forward (its own rematerialisation then plans memory)."""
import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor, nn

from gist_fast.lean_block import grads_of, resolve_mode
from gist_fast.peft.blocks import Steps, attention_residual, mlp_residual, steps_forward


def bind(block: nn.Module, mode: str, *, steps) -> functools.partial:
    """The forward patch() binds to a block (structure checked by lean_block.unsupported_reason)."""
    return functools.partial(lean_steps_forward, block, steps=steps, mode=mode)


def lean_steps_forward(block: nn.Module, x: Tensor, *, steps, mode: str, **attn_kwargs) -> Tensor:
    # "auto" resolves from the input: models are patched on the CPU and then moved.
    mode = resolve_mode(mode, x)
    params = [p for p in block.parameters() if p.requires_grad]
    if (mode is None or torch.compiler.is_compiling()
            or not (torch.is_grad_enabled() and (x.requires_grad or params))):
        return steps_forward(block, x, steps=steps, **attn_kwargs)
    if mode == "lean" and (steps.fc1 is not Steps.fc1 or any(p.requires_grad for p in block.mlp.fc1.parameters())):
        mode = "min"  # "lean" computes fc1's input gradient as g_u @ W: a frozen, plain fc1 only
    return _LeanSteps.apply(block, steps, mode, attn_kwargs, x, *params)


def _rng_state(x: Tensor):
    return torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None


@contextlib.contextmanager
def _replayed_rng(state, x: Tensor):
    """The forward's RNG state for the replay; the caller's is restored after."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], x.device)
        yield


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


class _LeanSteps(torch.autograd.Function):
    """One block of a Steps kind; saves x (and u in "lean")."""

    @staticmethod
    def forward(ctx, block, steps, mode, attn_kwargs, x, *params):
        dev = x.device.type
        ctx.rng = _rng_state(x) if block.training else None
        ctx.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                            dtype=torch.get_autocast_dtype(dev))
        x1 = attention_residual(block, steps, x, attn_kwargs)
        u = steps.fc1(block, steps.norm2(block, x1))
        ctx.block, ctx.steps, ctx.attn_kwargs, ctx.params = block, steps, attn_kwargs, params
        ctx.save_for_backward(x, u if mode == "lean" else None)
        return mlp_residual(block, steps, x1, u)

    @staticmethod
    def backward(ctx, dy):
        x, u = ctx.saved_tensors
        block, steps, params = ctx.block, ctx.steps, list(ctx.params)
        x_leaf = x.detach().requires_grad_(ctx.needs_input_grad[4])
        wrt = [x_leaf] + params  # grads_of: None for x when it needs none
        # The graphs are built as the forward ran (its RNG and autocast state); the gradients are taken outside
        # autocast, as autograd runs the eager block's backward.
        with torch.enable_grad(), _replayed_rng(ctx.rng, x):
            with torch.autocast(**ctx.autocast):
                x1 = attention_residual(block, steps, x_leaf, ctx.attn_kwargs)
                h2 = steps.norm2(block, x1)
                if u is None:
                    y = mlp_residual(block, steps, x1, steps.fc1(block, h2))
                else:
                    x1_leaf, u_leaf = x1.detach().requires_grad_(), u.detach().requires_grad_()  # the MLP's own graph
                    y = mlp_residual(block, steps, x1_leaf, u_leaf)
            if u is None:
                grads = grads_of([y], wrt, [dy])
            else:
                g_x1, g_u, *g_back = grads_of([y], [x1_leaf, u_leaf] + params, [dy])
                g_h2 = g_u @ block.mlp.fc1.weight.to(g_u.dtype)  # fc1 is frozen and plain here: its input gradient
                g_x, *g_front = grads_of([x1, h2], wrt, [g_x1, g_h2.to(h2.dtype)])
                grads = [g_x] + [_add(a, b) for a, b in zip(g_front, g_back)]
        return (None, None, None, None, *grads)
