"""Expectations for the kernel op upsample_shift_add (and its backward),
shared by tests/test_cuda_emu.py, tests/test_cuda.py and tests/test_triton.py.

Nothing here calls pyramid_ext. Two independent statements of the op:
- `eager_shift_add`: PyTorch's own ops, as the op's contract reads: each tap
  tensor F.interpolate'd to (H, W), zero-padded by p = K // 2 and its K*K
  channel groups added at their shifts (the torch backend's recipe, written
  again here);
- `shift_add_fp64` / `shift_add_backward_fp64`: the same sum in fp64 with
  ATen's bilinear weights as matrices computed in a chosen dtype (the kernels'
  accumulation type: `_helpers.bilinear_weights`), and the sums of the
  absolute terms, for a per-element error bound (`check_shift_add`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._helpers import acc_dtype, bilinear_weights, grad_close


def tap_shapes(taps: Sequence[torch.Tensor]) -> List[int]:
    """The backward op's flat (h_0, w_0, h_1, w_1, ...)."""
    return [int(s) for t in taps for s in t.shape[2:]]


def eager_shift_add(base: torch.Tensor, taps: Sequence[torch.Tensor], kernel_size: int, align_corners: bool,
                    interp_dtype=None):
    """base + sum_i sum_{a,c} shift_{a-p, c-p}(F.interpolate(taps[i])[:, (a*K+c)*Cout:...]), zero padding,
    with PyTorch's ops (differentiable), in base's dtype; with interp_dtype,
    each F.interpolate runs in that dtype (float32: ATen's float weights, as
    the kernels' opmath type computes them) and its result is cast back."""
    n, cout, h, w = base.shape
    p = kernel_size // 2
    out = base
    for t in taps:
        src = t if interp_dtype is None else t.to(interp_dtype)
        up = F.interpolate(src, size=(h, w), mode="bilinear", align_corners=align_corners).to(base.dtype)
        padded = F.pad(up, (p, p, p, p))
        for a in range(kernel_size):
            for c in range(kernel_size):
                k = a * kernel_size + c
                out = out + padded[:, k * cout:(k + 1) * cout, a:a + h, c:c + w]
    return out


def _weights(in_hw, out_hw, align_corners, weight_dtype):
    return (bilinear_weights(in_hw[0], out_hw[0], align_corners, weight_dtype),
            bilinear_weights(in_hw[1], out_hw[1], align_corners, weight_dtype))


def _shift_sum(base, ups, kernel_size):
    n, cout, h, w = base.shape
    p = kernel_size // 2
    out = base.clone()
    for up in ups:
        padded = F.pad(up, (p, p, p, p))
        for a in range(kernel_size):
            for c in range(kernel_size):
                k = a * kernel_size + c
                out += padded[:, k * cout:(k + 1) * cout, a:a + h, c:c + w]
    return out


def shift_add_fp64(base, taps, kernel_size: int, align_corners: bool, weight_dtype=torch.float32
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(result, sum of |terms|) in fp64 on the CPU, the bilinear weights
    computed in weight_dtype with ATen's formulas."""
    base = base.detach().double().cpu()
    hw = tuple(base.shape[2:])
    want = [base]
    absolute = [base.abs()]
    for t in taps:
        t = t.detach().double().cpu()
        wy, wx = _weights(t.shape[2:], hw, align_corners, weight_dtype)
        want.append(torch.einsum("yi,ncij,xj->ncyx", wy, t, wx))
        absolute.append(torch.einsum("yi,ncij,xj->ncyx", wy.abs(), t.abs(), wx.abs()))
    return _shift_sum(want[0], want[1:], kernel_size), _shift_sum(absolute[0], absolute[1:], kernel_size)


def shift_add_backward_fp64(grad, shapes: Sequence[Tuple[int, int]], kernel_size: int, align_corners: bool,
                            weight_dtype=torch.float32) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per tap tensor (gradient, sum of |terms|) in fp64 on the CPU: the
    adjoint of shift_add_fp64, written out (shift back, then Wy^T . Wx)."""
    g = grad.detach().double().cpu()
    n, cout, h, w = g.shape
    p = kernel_size // 2
    out = []
    for gg in (g, g.abs()):
        padded = torch.zeros(n, kernel_size * kernel_size * cout, h + 2 * p, w + 2 * p, dtype=torch.float64)
        for a in range(kernel_size):
            for c in range(kernel_size):
                k = a * kernel_size + c
                padded[:, k * cout:(k + 1) * cout, a:a + h, c:c + w] += gg
        out.append(padded[:, :, p:p + h, p:p + w])
    grad_up, abs_up = out
    result = []
    for ih, iw in shapes:
        wy, wx = _weights((ih, iw), (h, w), align_corners, weight_dtype)
        result.append((torch.einsum("yi,ncyx,xj->ncij", wy, grad_up, wx),
                       torch.einsum("yi,ncyx,xj->ncij", wy.abs(), abs_up, wx.abs())))
    return result


def forward_chain(n_taps: int, kernel_size: int) -> int:
    """The longest chain of roundings in one output element: the additions
    of base and every sample, plus three per bilinear sample."""
    return 1 + n_taps * kernel_size * kernel_size + 3


# Backward: runs of at most 12 float additions, the terms rounded at most
# twice (wh * ww * g), everything after the runs in double.
BACKWARD_CHAIN = 14


# Against eager_shift_add (F.interpolate in the accumulation type, the samples
# summed in fp64; tolerances rtol of the dtype plus this atol): a float32 sum
# of K*K*len(taps) samples also differs by its own roundings and by ATen's
# FMA-contracted source index (one rounding: about 6e-8 * source index per
# sample, csrc/pyramid_index.h); measured up to 1.2e-5 on 61-row taps.
EAGER_ATOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_shift_add(got, want, terms, dtype, n_sum: int, what: str = "") -> None:
    """got (dtype, accumulated in its opmath type) against the fp64
    expectation: 2 u_dtype |want| + 2 n_sum u_acc sum|terms| per element
    (_helpers.grad_close). fp64 results sum in fp64 throughout, so there the
    chain may be every term of a plane."""
    if dtype == torch.float64:
        n_sum = max(n_sum, 1 << 16)  # a bound of 1.5e-11 sum|terms|
    assert got.dtype == dtype, (got.dtype, dtype)
    grad_close(got, want, dtype, terms=terms, n_sum=n_sum, what=what)


def weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute the bilinear weights in."""
    return acc_dtype(dtype)
