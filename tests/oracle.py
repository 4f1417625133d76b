"""DESIGN rule 7: compare ours, the reference in the same dtype and the reference in float64.

Ours must stay within twice the reference's own error against float64, plus a small atol scaled
by the magnitude of the exact value."""
import torch

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_oracle(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, name: str, dtype=None) -> None:
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    ours64, ref64 = ours.double(), ref.double()
    finite = exact.isfinite()
    assert torch.equal(finite, ours64.isfinite()), f"{name}: non-finite entries differ from the exact result"
    assert torch.equal(exact[~finite].isnan(), ours64[~finite].isnan()), f"{name}: NaN/inf pattern differs"
    if not finite.any():
        return
    exact, ours64, ref64 = exact[finite], ours64[finite], ref64[finite]
    ref_err = (ref64 - exact).abs().nan_to_num(0).max().item()
    our_err = (ours64 - exact).abs().max().item()
    atol = ATOL[dtype or ours.dtype] * (1.0 + exact.abs().max().item())
    assert our_err <= 2 * ref_err + atol, (f"{name}: error {our_err:.3g} > 2 x reference error {ref_err:.3g} "
                                           f"+ {atol:.2g}")
