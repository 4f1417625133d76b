"""The PEFT ops of METHODS §6, SSF (ops.scale_shift) and the per-head LoRA on q and v (ops.lora_qv), against
gist_fast.reference in the same dtype and in float64, on every implementation this machine has."""
import contextlib

import pytest
import torch

from backends import BACKENDS, TRITON_RUNS, use_backend
from backends import device as _device
from gist_fast import ops, reference
from gist_fast.ops import lora_qv_torch, scale_shift_torch
from oracle import assert_oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF = [torch.bfloat16, torch.float16]


def _rnd(g, *shape, std=1.0, mean=0.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=dtype)


def _run(fn, inputs, grad, backend=None, autocast=None):
    """Forward + backward with the upstream gradient `grad` (cast to the output's dtype); returns the output and
    the inputs' gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with use_backend(backend) if backend else contextlib.nullcontext():  # the backward too runs on `backend`
        with torch.autocast("cpu", autocast) if autocast else contextlib.nullcontext():
            out = fn(*leaves)
        out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check(ours_fn, ref_fn, inputs, grad, backend, dtype, names, autocast=None):
    """ours within twice the same-dtype reference's error against float64 (plus atol), output and every
    gradient."""
    ours = _run(ours_fn, inputs, grad, backend, autocast)
    ref = _run(ref_fn, inputs, grad, autocast=autocast)
    exact = _run(ref_fn, [t.double() for t in inputs], grad.double())
    assert ours[0].dtype == inputs[0].dtype, "the output has the input's dtype"
    assert_oracle(ours[0], ref[0], exact[0], f"{backend} {dtype} out", dtype)
    for name, t, o, r, e in zip(names, inputs, ours[1], ref[1], exact[1]):
        assert o.dtype == t.dtype, f"grad {name} has its input's dtype"
        assert_oracle(o, r, e, f"{backend} {dtype} grad {name}", dtype)


# ---------------------------------------------------------------- scale_shift (SSF)
SSF_SHAPES = [(7, 48), (2, 33, 48), (33, 300), (5, 1)]  # D = 300: two column blocks; D = 1: all but one lane masked
SSF_NAMES = ["x", "scale", "shift"]


def _ssf_inputs(shape, dtype, param_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = shape[-1]
    return [_rnd(g, *shape, dtype=dtype, device=device), _rnd(g, dim, std=0.5, mean=1.0, dtype=param_dtype,
                                                               device=device),
            _rnd(g, dim, std=0.5, dtype=param_dtype, device=device)]


def _ssf_fns(gelu):
    return (lambda x, s, b: ops.scale_shift(x, s, b, gelu), lambda x, s, b: reference.scale_shift(x, s, b, gelu))


def _check_ssf(backend, dtype, shape, gelu, param_dtype=None, nan=False):
    inputs = _ssf_inputs(shape, dtype, param_dtype or dtype, _device(backend))
    if nan:
        inputs[0].view(-1, shape[-1])[0, shape[-1] // 2] = float("nan")
    grad = _rnd(torch.Generator().manual_seed(1), *shape, device=inputs[0].device)
    ours, ref = _ssf_fns(gelu)
    _check(ours, ref, inputs, grad, backend, dtype, SSF_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SSF_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gelu", [False, True], ids=["affine", "gelu"])
def test_scale_shift_matches_reference(backend, dtype, shape, gelu):
    _check_ssf(backend, dtype, shape, gelu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("gelu", [False, True], ids=["affine", "gelu"])
def test_scale_shift_16bit_x_with_fp32_parameters(backend, dtype, gelu):
    """SSF's parameters stay fp32 under autocast while x is a 16-bit sub-layer output: the output and grad x in
    x's dtype, the parameters' gradients in fp32."""
    _check_ssf(backend, dtype, (2, 33, 48), gelu, param_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [False, True], ids=["affine", "gelu"])
def test_scale_shift_nan_in_nan_out(backend, gelu):
    """A NaN in x: NaN in that output entry, its grad x entry and its column's parameter gradients only."""
    _check_ssf(backend, torch.float32, (7, 48), gelu, nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_shift_any_layout(backend):
    x, s, b = _ssf_inputs((7, 2, 48), torch.float32, torch.float32, _device(backend))
    x = x.transpose(0, 2).contiguous().transpose(0, 2)  # the same values, column-major
    assert not x.is_contiguous()
    with use_backend(backend):
        torch.testing.assert_close(ops.scale_shift(x, s, b, True), reference.scale_shift(x, s, b, True))


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("gelu", [False, True], ids=["affine", "gelu"])
def test_scale_shift_kernel_reductions(atomic, gelu):
    """Both weight-gradient reductions of the Triton backward, with programs that walk several row tiles."""
    kernels = pytest.importorskip("gist_fast.kernels.scale_shift")
    if not TRITON_RUNS:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = _device("triton")
    x, s, b = _ssf_inputs((65, 300), torch.float32, torch.float32, device)
    g = torch.randn_like(x)
    ours = kernels.scale_shift_bwd(g, x, s, b, gelu, block_m=4, atomic=atomic)  # 17 tiles, 16 programs
    for o, r in zip(ours, scale_shift_torch.scale_shift_bwd(g, x, s, b, gelu)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_scale_shift_float64_takes_the_reference_path():
    x, s, b = (t.double() for t in _ssf_inputs((7, 48), torch.float32, torch.float32, "cpu"))
    torch.testing.assert_close(ops.scale_shift(x, s, b, True), reference.scale_shift(x, s, b, True), rtol=0, atol=0)


def test_scale_shift_bad_shapes_raise_clear_errors():
    x, s, b = _ssf_inputs((7, 48), torch.float32, torch.float32, "cpu")
    for bad in ((x, s[:47], b), (x, s, b[:47]), (x, s.view(6, 8), b), (x, s[None], b[None])):
        with pytest.raises(ValueError, match=r"scale and shift must be 1-D of x's last dimension \(48,\)"):
            ops.scale_shift(*bad)
    with pytest.raises(ValueError, match="x must have a channel"):
        ops.scale_shift(torch.tensor(1.0), s, b)


# ---------------------------------------------------------------- lora_qv (per-head LoRA on q and v)
# (leading shape, heads, d_h, rank q, rank v): D = 48 as 3 heads of 16 at ranks 1, 3, 4 on 7 and 2 x 33 rows;
# d_h = 80 (padded to 128, masked) at the largest rank; different ranks for q and v; ViT-B's D = 768, 12 heads
LORA_SHAPES = [((7,), 3, 16, 1, 1), ((2, 33), 3, 16, 3, 3), ((33,), 3, 16, 4, 4), ((5,), 2, 80, 64, 64),
               ((9,), 2, 24, 3, 5), ((2, 7), 12, 64, 8, 8)]
LORA_NAMES = ["qkv", "down_q", "up_q", "down_v", "up_v"]
ALPHA = 0.7


def _lora_inputs(lead, heads, head_dim, rank_q, rank_v, dtype, factor_dtype, device, seed=0):
    """qkv and random (never zero: down_q starts at 0 in the model) factors scaled to keep the update O(1)."""
    g = torch.Generator().manual_seed(seed)
    qkv = _rnd(g, *lead, 3 * heads * head_dim, dtype=dtype, device=device)
    factors = []
    for r in (rank_q, rank_v):
        factors += [_rnd(g, r, head_dim, std=head_dim ** -0.5, dtype=factor_dtype, device=device),
                    _rnd(g, head_dim, r, std=r ** -0.5, dtype=factor_dtype, device=device)]
    return [qkv, *factors]


def _lora_fns(heads):
    return (lambda qkv, *factors: ops.lora_qv(qkv, *factors, ALPHA, heads),
            lambda qkv, *factors: reference.lora_qv(qkv, *factors, ALPHA, heads))


def _check_lora(backend, dtype, shape, factor_dtype=None, autocast=None, nan=False):
    lead, heads, head_dim, rank_q, rank_v = shape
    inputs = _lora_inputs(lead, heads, head_dim, rank_q, rank_v, dtype, factor_dtype or dtype, _device(backend))
    if nan:
        flat = inputs[0].view(-1, inputs[0].shape[-1])
        flat[0, head_dim + 1] = float("nan")  # q, head 1
        flat[-1, heads * head_dim] = float("nan")  # k, head 0
    grad = _rnd(torch.Generator().manual_seed(1), *inputs[0].shape, device=inputs[0].device)
    ours, ref = _lora_fns(heads)
    _check(ours, ref, inputs, grad, backend, dtype, LORA_NAMES, autocast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_lora_qv_matches_reference(backend, dtype, shape):
    _check_lora(backend, dtype, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-math", "autocast"])
def test_lora_qv_16bit_qkv_with_fp32_factors(backend, dtype, autocast):
    """A 16-bit qkv (the qkv Linear's output under autocast) with fp32 factors: the output and grad qkv in qkv's
    dtype, the factors' gradients in fp32; the LoRA dots in qkv's dtype (the reference's factors follow it), under
    autocast in autocast's (as eager runs the linears), the reference under the same autocast."""
    _check_lora(backend, dtype, LORA_SHAPES[1], factor_dtype=torch.float32, autocast=dtype if autocast else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_qv_nan_in_nan_out(backend):
    """A NaN in q spreads over its (row, head) output and up_q's gradient; one in k stays in its entry."""
    _check_lora(backend, torch.float32, LORA_SHAPES[1], nan=True)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "deterministic"])
def test_lora_qv_kernel_reductions(atomic):
    """Both weight-gradient reductions of the Triton backward, with programs that walk several tiles."""
    kernels = pytest.importorskip("gist_fast.kernels.lora_qv")
    if not TRITON_RUNS:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    qkv, *factors = _lora_inputs((33,), 3, 16, 4, 3, torch.float32, torch.float32, _device("triton"))
    g = torch.randn_like(qkv)
    ours = kernels.lora_qv_bwd(g, qkv, *factors, ALPHA, 3, block_n=16, atomic=atomic)  # 7 tiles per part
    for o, r in zip(ours, lora_qv_torch.lora_qv_bwd(g, qkv, *factors, ALPHA, 3)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_qv_beyond_the_kernels_runs_the_contract(backend):
    """A rank above the kernels' largest, a head dimension above theirs, factors of two dtypes: the plain-torch
    contract serves on the Triton backend too."""
    for lead, heads, head_dim, rank_q, rank_v in (((3,), 2, 16, 65, 2), ((3,), 1, 144, 2, 2)):
        inputs = _lora_inputs(lead, heads, head_dim, rank_q, rank_v, torch.float32, torch.float32, _device(backend))
        with use_backend(backend):
            out = ops.lora_qv(*inputs, ALPHA, heads)
        torch.testing.assert_close(out, reference.lora_qv(*inputs, ALPHA, heads))
    qkv, dq, uq, dv, uv = _lora_inputs((3,), 2, 16, 2, 2, torch.float32, torch.float32, _device(backend))
    with use_backend(backend):
        out = ops.lora_qv(qkv, dq.bfloat16(), uq, dv, uv, ALPHA, 2)
    torch.testing.assert_close(out, reference.lora_qv(qkv, dq.bfloat16().float(), uq, dv, uv, ALPHA, 2))


def test_lora_qv_float64_takes_the_reference_path():
    inputs = [t.double() for t in _lora_inputs((2, 5), 3, 16, 4, 4, torch.float32, torch.float32, "cpu")]
    torch.testing.assert_close(ops.lora_qv(*inputs, ALPHA, 3), reference.lora_qv(*inputs, ALPHA, 3), rtol=0, atol=0)


def test_lora_qv_bad_shapes_raise_clear_errors():
    qkv, dq, uq, dv, uv = _lora_inputs((7,), 3, 16, 4, 4, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"last dimension must be 3D with D divisible by num_heads=5"):
        ops.lora_qv(qkv, dq, uq, dv, uv, ALPHA, 5)
    with pytest.raises(ValueError, match=r"last dimension must be 3D"):
        ops.lora_qv(qkv[:, :-1], dq, uq, dv, uv, ALPHA, 3)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.lora_qv(qkv, dq, uq, dv, uv, ALPHA, 0)
    with pytest.raises(ValueError, match=r"factors of q must be down_q \(r, d_h\) and up_q \(d_h, r\) with d_h = 16"):
        ops.lora_qv(qkv, uq, dq, dv, uv, ALPHA, 3)
    with pytest.raises(ValueError, match=r"factors of v .* got \(4, 16\) and \(16, 3\)"):
        ops.lora_qv(qkv, dq, uq, dv, uv[:, :3], ALPHA, 3)
    with pytest.raises(ValueError, match="factors of q"):
        ops.lora_qv(qkv, dq[:, :8], uq[:8], dv, uv, ALPHA, 3)


# ---------------------------------------------------------------- registration
def _opcheck_cases(device):
    """Both ops and their backward ops, forward ops with gradients wanted (opcheck runs their backward through
    the autograd formula too)."""
    x, s, b = (t.requires_grad_() for t in _ssf_inputs((7, 48), torch.float32, torch.float32, device))
    qkv, *factors = (t.requires_grad_() for t in _lora_inputs((7,), 3, 16, 4, 3, torch.float32, torch.float32,
                                                                device))
    detached = [t.detach() for t in (x, s, b, qkv, *factors)]
    g = torch.Generator().manual_seed(2)
    gx, gqkv = _rnd(g, 7, 48, device=device), _rnd(g, 7, 144, device=device)
    gist = torch.ops.gist_fast
    return [
        (gist.scale_shift.default, (x, s, b, False)),
        (gist.scale_shift.default, (x, s, b, True)),
        (gist.scale_shift.default, (x.detach().bfloat16().requires_grad_(), s, b, True)),
        (gist.scale_shift_bwd.default, (gx, *detached[:3], True)),
        (gist.lora_qv.default, (qkv, *factors, ALPHA, 3)),
        (gist.lora_qv.default, (qkv, *factors, ALPHA, 3, torch.bfloat16)),
        (gist.lora_qv_bwd.default, (gqkv, *detached[3:], ALPHA, 3)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake, autograd registration and torch.compile tracing of both ops and their backward ops, on each
    implementation here."""
    from torch.library import opcheck

    with use_backend(backend):
        for op, args in _opcheck_cases(_device(backend)):
            opcheck(op, args)
