"""K7: MeZO in-place update param += scale * z with z generated in-kernel from (seed, offset).

z follows `compressor.kernels.ref.mezo_normal` exactly: normal number g of the stream is lane g % 4
of `tl.randn4x(seed, g // 4)`. Each program owns BLOCK_Q Philox counters, i.e. 4 * BLOCK_Q
consecutive elements; one Philox call per four elements keeps the integer work under the memory
time, so the update runs at copy speed (one read and one write of the parameter).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import check_runnable, host_rounding, interpreting


@triton.jit
def _mezo_axpy_kernel(p_ptr, numel, seed, offset, scale, BLOCK_Q: tl.constexpr):
    counter0 = offset // 4 + tl.program_id(0).to(tl.int64) * BLOCK_Q
    counters = counter0 + tl.arange(0, BLOCK_Q).to(tl.int64)
    z0, z1, z2, z3 = tl.randn4x(seed, counters)
    # (BLOCK_Q, 2, 2) -> (4 * BLOCK_Q,): lanes 0, 1, 2, 3 of each counter, in element order
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * BLOCK_Q,))
    elem = counter0 * 4 - offset + tl.arange(0, 4 * BLOCK_Q)
    mask = (elem >= 0) & (elem < numel)
    p = tl.load(p_ptr + elem, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + elem, (p + scale * z).to(p_ptr.dtype.element_ty), mask=mask)


def mezo_axpy_(param: Tensor, seed: int, offset: int, scale: float) -> None:
    """Same contract as `compressor.kernels.ref.mezo_axpy_`."""
    scale = _checks.mezo(param, seed, offset, scale)
    check_runnable("mezo_axpy_", param)
    numel = param.numel()
    if numel == 0:
        return
    block_q = 256 if interpreting() else 1024
    counters = (offset + numel - 1) // 4 - offset // 4 + 1
    grid = (triton.cdiv(counters, block_q),)
    # The interpreter cannot round fp32 -> bf16 (see _common.upcast_dot): update an fp32 copy and
    # let torch round it; the maths (one rounding of p + scale * z) is unchanged.
    target = param.float() if host_rounding(param.dtype) else param
    _mezo_axpy_kernel[grid](
        target, numel, seed, offset, scale, BLOCK_Q=block_q, num_warps=8 if block_q >= 1024 else 4
    )
    if target is not param:
        param.copy_(target)
