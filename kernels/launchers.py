"""Launchers for the deformable local attention kernels: shapes in, tensors out, no autograd."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .deformable_local_attention import dla_bwd_kernel, dla_bwd_kv_gather_kernel, dla_fwd_kernel

# kernels are decorated at import: the interpreter is on only if it was on then
INTERPRET = bool(triton.knobs.runtime.interpret)
# bumped whenever a kernel change invalidates tuned configurations
KERNEL_VERSION = 1


class Problem(NamedTuple):
    """What a kernel is specialised on, and what tuning is keyed by."""
    B: int
    D: int
    C: int
    H: int
    W: int
    Ho: int
    Wo: int
    G: int
    NH: int
    K: int

    @staticmethod
    def of(q: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, num_groups: int, num_heads: int) -> "Problem":
        B, D, Ho, Wo = q.shape
        _, C, H, W = v.shape
        return Problem(B, D, C, H, W, Ho, Wo, num_groups, num_heads, offset.shape[1] // (2 * num_groups))

    def widest_segment(self, channels: int) -> int:
        """Widest run of channels that shares one group and one head."""
        return max(hi - lo for _, _, lo, hi in segments(channels, self.G, self.NH))


def segments(channels: int, G: int, NH: int) -> list[tuple[int, int, int, int]]:
    """(group, head, first, end) of each channel run with one group and one head."""
    cuts = sorted({i * channels // G for i in range(G + 1)} | {i * channels // NH for i in range(NH + 1)})
    return [(lo * G // channels, lo * NH // channels, lo, hi) for lo, hi in zip(cuts, cuts[1:])]


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration; the autotuner searches over these."""
    block_p: int = 64
    block_d: int = 32
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 1
    channels_last: bool = True

    def fits(self, pb: Problem) -> bool:
        """Whether the tiles are no wider than they need to be for this problem."""
        return (self.block_d <= triton.next_power_of_2(pb.widest_segment(pb.D))
                and self.block_c <= triton.next_power_of_2(pb.widest_segment(pb.C)))


def default_config(pb: Problem, backward: bool = False, interpret: bool = INTERPRET) -> Config:
    """Used when the tuning cache has no entry; chosen from ptxas reports (sm_90: no spills for k_u up
    to 9, nh up to 4), not from timings. The [BLOCK_P, NH_PAD, K_PAD] state tiles bound the pixel
    tile; the backward keeps more tiles live and takes narrower channel chunks."""
    state = triton.next_power_of_2(pb.NH) * triton.next_power_of_2(pb.K)
    seg_d = triton.next_power_of_2(pb.widest_segment(pb.D))
    seg_c = triton.next_power_of_2(pb.widest_segment(pb.C))
    if interpret:  # fewer, larger programs: the interpreter pays per program, not per lane
        return Config(block_p=128, block_d=seg_d, block_c=seg_c)
    if not backward:
        return Config(block_p=32 if state <= 16 else 16, block_d=min(32, seg_d), block_c=min(64, seg_c))
    block_p, num_warps = (32, 4) if state == 1 else (32, 8) if state <= 64 else (16, 4)
    return Config(block_p=block_p, block_d=min(16, seg_d), block_c=min(16, seg_c), num_warps=num_warps)


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an offset inside one batch element can pass int32 (batch offsets are always int64)."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31 - 1 for t in tensors)


def _prepare(k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, cfg: Config):
    if cfg.channels_last:  # a corner's channels become one contiguous run
        k = k.contiguous(memory_format=torch.channels_last)
        v = v.contiguous(memory_format=torch.channels_last)
    return k, v, offset.contiguous()


def _grid(pb: Problem, cfg: Config):
    return (triton.cdiv(pb.Ho * pb.Wo, cfg.block_p), pb.B)


def dla_fwd(q, k, v, offset, rpb, num_heads: int, num_groups: int, scale: float,
            config: Config | None = None, need_attn: bool = True, force_int64: bool = False):
    """out [B, C, Ho, Wo] in q's dtype, and the attention [B, nh, K, Ho, Wo] in the accumulation
    dtype (None unless need_attn) that the backward reuses."""
    pb = Problem.of(q, v, offset, num_groups, num_heads)
    cfg = config or default_config(pb)
    k, v, offset = _prepare(k, v, offset, cfg)
    acc_t, acc_tl = _acc(q.dtype)
    out = torch.empty(pb.B, pb.C, pb.Ho, pb.Wo, dtype=q.dtype, device=q.device)
    attn = torch.empty(pb.B, pb.NH, pb.K, pb.Ho, pb.Wo, dtype=acc_t, device=q.device) if need_attn else out
    rpb_arg = rpb.contiguous() if rpb is not None else q
    dla_fwd_kernel[_grid(pb, cfg)](
        q, k, v, offset, rpb_arg, out, attn,
        *q.stride(), *k.stride(), *v.stride(), offset.stride(0),
        pb.H, pb.W, pb.Ho, pb.Wo, scale,
        D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K,
        NH_PAD=triton.next_power_of_2(pb.NH), K_PAD=triton.next_power_of_2(pb.K),
        BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d, BLOCK_C=cfg.block_c,
        HAS_RPB=rpb is not None, STORE_ATTN=need_attn,
        INT64=force_int64 or _needs_int64(q, k, v, offset, out, attn), ACC=acc_tl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, (attn if need_attn else None)


def dla_bwd(dout, q, k, v, offset, rpb, attn, num_heads: int, num_groups: int, scale: float,
            config: Config | None = None, deterministic: bool = False, force_int64: bool = False):
    """Gradients (dq, dk, dv, doffset, drpb) in the dtypes of their inputs. With deterministic,
    dk and dv are summed in a fixed order (sort + gather) instead of by atomics."""
    pb = Problem.of(q, v, offset, num_groups, num_heads)
    cfg = config or default_config(pb, backward=True)
    k_in, v_in, off_in = k, v, offset
    k, v, offset = _prepare(k, v, offset, cfg)
    acc_t, acc_tl = _acc(q.dtype)
    dev = q.device
    P = pb.Ho * pb.Wo
    grid = _grid(pb, cfg)
    dq = torch.empty(pb.B, pb.D, pb.Ho, pb.Wo, dtype=q.dtype, device=dev)
    doff = torch.empty(pb.B, 2 * pb.G * pb.K, pb.Ho, pb.Wo, dtype=acc_t, device=dev)
    drpb = torch.empty(grid[0] * grid[1], pb.NH, pb.K, pb.D // pb.NH, dtype=acc_t, device=dev) if rpb is not None else doff
    # channels-last accumulators: a corner's atomics hit one contiguous run
    alloc = torch.empty if deterministic else torch.zeros
    dk = alloc(pb.B, pb.H, pb.W, pb.D, dtype=acc_t, device=dev).permute(0, 3, 1, 2)
    dv = alloc(pb.B, pb.H, pb.W, pb.C, dtype=acc_t, device=dev).permute(0, 3, 1, 2)
    ds = torch.empty(pb.B, pb.NH, pb.K, P, dtype=acc_t, device=dev) if deterministic else doff
    dla_bwd_kernel[grid](
        q, k, v, offset, rpb.contiguous() if rpb is not None else q, attn, dout, dq, dk, dv, doff, drpb, ds,
        *q.stride(), *k.stride(), *v.stride(), offset.stride(0),
        *dout.stride(), *dk.stride(), *dv.stride(),
        pb.H, pb.W, pb.Ho, pb.Wo, scale,
        D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K,
        NH_PAD=triton.next_power_of_2(pb.NH), K_PAD=triton.next_power_of_2(pb.K),
        BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d, BLOCK_C=cfg.block_c,
        HAS_RPB=rpb is not None, ATOMIC=not deterministic,
        INT64=force_int64 or _needs_int64(q, k, v, offset, dout, dq, dk, dv, doff, attn), ACC=acc_tl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if deterministic:
        dk, dv = _kv_grad_deterministic(pb, cfg, q, dout, offset, attn, ds, acc_t, acc_tl)
    # one pass each from the accumulators into the inputs' dtype and memory layout
    return (dq, torch.empty_like(k_in).copy_(dk), torch.empty_like(v_in).copy_(dv),
            torch.empty_like(off_in).copy_(doff), drpb.sum(0).to(rpb.dtype) if rpb is not None else None)


def sample_corners(offset: torch.Tensor, pb: Problem, acc_t: torch.dtype):
    """Every bilinear corner read by the forward: (target input pixel, weight, valid), each
    [B, G, K, 4, Ho*Wo], computed with the kernels' arithmetic."""
    P = pb.Ho * pb.Wo
    off = offset.reshape(pb.B, pb.G, pb.K, 2, P).to(acc_t)
    o_p = torch.arange(P, device=offset.device)
    one = torch.ones((), dtype=acc_t, device=offset.device)
    rh = (pb.H - 1) * one / max(pb.Ho - 1, 1) * (pb.Ho > 1)
    rw = (pb.W - 1) * one / max(pb.Wo - 1, 1) * (pb.Wo > 1)
    iy = ((o_p // pb.Wo).to(acc_t) + off[:, :, :, 0]) * rh
    ix = ((o_p % pb.Wo).to(acc_t) + off[:, :, :, 1]) * rw
    y0, x0 = iy.floor(), ix.floor()
    ly, lx = iy - y0, ix - x0
    ty, tx, wy, wx = [], [], [], []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        ty.append(y0 + dy)
        tx.append(x0 + dx)
        wy.append(ly if dy else 1 - ly)
        wx.append(lx if dx else 1 - lx)
    ty, tx = torch.stack(ty, 3), torch.stack(tx, 3)
    valid = (ty >= 0) & (ty <= pb.H - 1) & (tx >= 0) & (tx <= pb.W - 1)
    target = torch.where(valid, ty * pb.W + tx, 0).long()
    return target, torch.stack(wy, 3) * torch.stack(wx, 3), valid


def _kv_grad_deterministic(pb: Problem, cfg: Config, q, dout, offset, attn, ds, acc_t, acc_tl):
    HW, P = pb.H * pb.W, pb.Ho * pb.Wo
    target, weight, valid = sample_corners(offset, pb, acc_t)
    dev = q.device
    bg = torch.arange(pb.B * pb.G, device=dev).view(pb.B, pb.G, 1, 1, 1)
    key = (bg * HW + target)[valid]
    # a stable sort keeps (n, corner, p) order within each input pixel: the sum order is fixed
    key, order = torch.sort(key, stable=True)
    src = torch.nonzero(valid.expand(pb.B, pb.G, pb.K, 4, P).reshape(-1)).squeeze(1)[order]
    src_p = (src % P).to(torch.int32)
    src_n = (src // (4 * P) % pb.K).to(torch.int32)
    src_w = weight.reshape(-1)[src]
    row_ptr = torch.zeros(pb.B * pb.G * HW + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(torch.bincount(key, minlength=pb.B * pb.G * HW), 0)
    q = q.contiguous()
    dout = dout.contiguous()
    dk = torch.empty(pb.B, pb.D, pb.H, pb.W, dtype=acc_t, device=dev)
    dv = torch.empty(pb.B, pb.C, pb.H, pb.W, dtype=acc_t, device=dev)
    dla_bwd_kv_gather_kernel[(pb.B * pb.G * HW,)](
        row_ptr, src_p, src_n, src_w, q, dout, attn, ds, dk, dv,
        q.stride(0), q.stride(1), dout.stride(0), dout.stride(1),
        HW, P,
        D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K, BLOCK_E=64 if INTERPRET else 32,
        BLOCK_D=min(cfg.block_d * 2, triton.next_power_of_2(pb.D // pb.G)),
        BLOCK_C=min(cfg.block_c * 2, triton.next_power_of_2(pb.C // pb.G)), ACC=acc_tl,
    )
    return dk, dv
