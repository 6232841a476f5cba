"""Launchers for the local upsampling kernels: shapes in, tensors out, no autograd."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from .layout import WEIGHT_MODES, WINDOWS, Spec, acc_dtype, segments, window_bounds  # noqa: F401 (Spec: the launchers' API)
from .local_upsample import upsample_bwd_gather_kernel, upsample_bwd_kernel, upsample_drpb_kernel, upsample_fwd_kernel

# kernels are decorated at import: the interpreter is on only if it was on then
INTERPRET = bool(triton.knobs.runtime.interpret)
# CUDA's limit on grid y and z; grid x takes 2**31 - 1
MAX_GRID_YZ = 65535
MAX_GRID_X = 2**31 - 1
# partial sums that the atomic backward's drpb is spread over (contention against scratch)
DRPB_SLOTS = 256
COORDS = {"align_corners": 0, "half_pixel": 1, "nearest": 2}


class Problem(NamedTuple):
    """What a kernel is specialised on, and what tuning is keyed by."""
    B: int
    D: int  # key channels; 0 without attention
    C: int
    H: int
    W: int
    Ho: int
    Wo: int
    G: int
    NH: int
    K: int
    weights: str = "attention"

    @staticmethod
    def of(v: torch.Tensor, size, q: Optional[torch.Tensor], spec: Spec) -> "Problem":
        B, C, H, W = v.shape
        return Problem(B, q.shape[1] if q is not None else 0, C, H, W, int(size[0]), int(size[1]), spec.G, spec.NH,
                       spec.K, spec.weights)

    def widest_segment(self, channels: int) -> int:
        """Widest run of channels that shares one group and one head."""
        return max((hi - lo for _, _, lo, hi in segments(channels, self.G, self.NH)), default=0)


def _even(channels: int, G: int, NH: int, block: int) -> bool:
    """Whether chunks of `block` channels tile every segment exactly (no channel mask needed)."""
    return all(lo % block == 0 and hi % block == 0 for _, _, lo, hi in segments(channels, G, NH))


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
        return (self.block_d <= triton.next_power_of_2(max(pb.widest_segment(pb.D), 1))
                and self.block_c <= triton.next_power_of_2(pb.widest_segment(pb.C)))


def default_config(pb: Problem, backward: bool = False, interpret: bool = INTERPRET) -> Config:
    """Used when the tuning cache has no entry; chosen from ptxas reports of JIT-specialised compiles
    (sm_90: no spills for k_u 1-9, nh up to 4, fp32/bf16/fp16, the deterministic backward too; at the
    FPN P2 problem, corner gathers of 64 bits or wider and 4-wide reductions), not from timings. Each
    thread holds 4+ contiguous channels of a corner; the forward's value chunk covers a 128-channel
    segment, so a neighbour's position serves all of its channels (the backward, with twice the live
    tiles, takes 32)."""
    seg_d = triton.next_power_of_2(max(pb.widest_segment(pb.D), 1))
    seg_c = triton.next_power_of_2(pb.widest_segment(pb.C))
    if interpret:  # fewer, larger programs: the interpreter pays per program, not per lane
        return Config(block_p=128, block_d=seg_d, block_c=seg_c)
    if backward:
        # more heads or neighbours, more per-pixel state and unrolled segments: a narrower pixel tile
        # keeps ptxas's register budget spill-free (bf16 at K = 49, one head, spilled at 32 pixels)
        return Config(block_p=32 if pb.NH <= 2 and pb.K <= 32 else 16, block_d=min(32, seg_d),
                      block_c=min(32, seg_c), num_warps=8)
    return Config(block_p=16, block_d=min(32, seg_d), block_c=min(128, seg_c), num_warps=4)


def split_float(x: float) -> tuple[float, float]:
    """(hi, lo), fp32 values whose sum is x to 48 bits: the JIT passes a float argument as fp32."""
    with np.errstate(over="ignore"):  # past fp32's range the kernels' fp32 math overflows alike
        hi = float(np.float32(x))
        return hi, float(np.float32(x - hi)) if abs(hi) < np.inf else 0.0


def _acc(dtype: torch.dtype):
    acc = acc_dtype(dtype)
    return acc, tl.float64 if acc == torch.float64 else tl.float32


def _needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an offset inside one batch element can pass int32 (batch offsets are always int64)."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31 - 1
               for t in tensors if t is not None)


def _channels_last(x: Optional[torch.Tensor], cfg: Config):
    # a corner's channels become one contiguous run
    if x is None or not cfg.channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _on_device(t: torch.Tensor):
    """Launch on t's device and its current stream: Triton launches on the current device's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _batches(B: int, per: int = MAX_GRID_YZ):
    """The batch in launches of at most `per` elements (the grid dimension it sits in)."""
    return [slice(b, min(b + per, B)) for b in range(0, B, max(per, 1))]  # none for an empty batch


def _rows(rows: slice, *tensors: Optional[torch.Tensor]):
    return [t[rows] if t is not None else None for t in tensors]


def _grid(pb: Problem, cfg: Config, rows: slice):
    return (triton.cdiv(pb.Ho * pb.Wo, cfg.block_p), rows.stop - rows.start)


def _constexprs(pb: Problem, spec: Spec, cfg: Config, dtype: torch.dtype, has_off: bool, has_rpb: bool,
                int64: bool) -> dict:
    """The constexpr arguments shared by the forward and backward kernels."""
    return dict(
        D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K,
        NH_PAD=triton.next_power_of_2(pb.NH), K_PAD=triton.next_power_of_2(pb.K), GRID=spec.grid,
        COORD=COORDS[spec.coords], BORDER=spec.padding == "border", WINDOW=WINDOWS[spec.window],
        WEIGHTS=WEIGHT_MODES[spec.weights],
        HAS_OFF=has_off, EXACT=spec.coords == "nearest" and not has_off, HAS_RPB=has_rpb, INT64=int64,
        ACC=_acc(dtype)[1], BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d, BLOCK_C=cfg.block_c,
        EVEN_D=pb.D == 0 or _even(pb.D, pb.G, pb.NH, cfg.block_d), EVEN_C=_even(pb.C, pb.G, pb.NH, cfg.block_c),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _flat(*maps: Optional[torch.Tensor]) -> bool:
    """Whether every given [B, C, Ho, Wo] map has its rows back to back (stride(2) == Wo * stride(3))."""
    return all(t.stride(2) == t.shape[3] * t.stride(3) or t.shape[2] == 1 for t in maps if t is not None)


def _window_table(pb: Problem, spec: Spec, device) -> Optional[torch.Tensor]:
    """int32 [first rows (Ho), first columns (Wo), rows (Ho), columns (Wo)] of a "ratio" window, else None."""
    if spec.window != "ratio":
        return None
    (ly, hy), (lx, hx) = (window_bounds(n, m, "ratio", None, spec.ratio) for n, m in ((pb.H, pb.Ho), (pb.W, pb.Wo)))
    return torch.cat([ly, lx, hy - ly, hx - lx]).to(device=device, dtype=torch.int32)


def _strides(x: Optional[torch.Tensor]):
    return x.stride() if x is not None else (0,) * 4


def upsample_fwd(v, size, spec: Spec, offset=None, q=None, k=None, rpb=None, wts=None,
                 config: Config | None = None, need_attn: bool = True, force_int64: bool = False):
    """out [B, C, Ho, Wo] in v's dtype, and for softmax weights (attention, logits) the weights
    [B, nh, K, Ho, Wo] in the accumulation dtype that the backward reuses (None unless need_attn).
    `wts` are the logits or the weights, [B, nh, K, Ho, Wo]."""
    pb = Problem.of(v, size, q, spec)
    cfg = config or default_config(pb)
    k, v = _channels_last(k, cfg), _channels_last(v, cfg)
    offset = offset.contiguous() if offset is not None else None
    wts = wts.contiguous() if wts is not None else None
    acc_t, _ = _acc(v.dtype)
    P = pb.Ho * pb.Wo
    out = torch.empty(pb.B, pb.C, pb.Ho, pb.Wo, dtype=v.dtype, device=v.device)
    need_attn = need_attn and spec.weights in ("attention", "logits")
    attn = torch.empty(pb.B, pb.NH, pb.K, pb.Ho, pb.Wo, dtype=acc_t, device=v.device) if need_attn else None
    int64 = force_int64 or _needs_int64(q, k, v, offset, wts, out, attn)
    rpb = rpb.contiguous() if rpb is not None else None
    win = _window_table(pb, spec, v.device)
    with _on_device(v):
        for rows in _batches(pb.B):
            q_b, k_b, v_b, off_b, wts_b, out_b, attn_b = _rows(rows, q, k, v, offset, wts, out, attn)
            upsample_fwd_kernel[_grid(pb, cfg, rows)](
                q_b if q is not None else v_b, k_b if k is not None else v_b, v_b, off_b if off_b is not None else v_b,
                rpb if rpb is not None else v_b, wts_b if wts_b is not None else v_b, out_b,
                attn_b if attn_b is not None else out_b, win if win is not None else out_b,
                *_strides(q), *_strides(k), *v.stride(), offset.stride(0) if offset is not None else 0,
                wts.stride(0) if wts is not None else 0,
                pb.H, pb.W, pb.Ho, pb.Wo, P, *split_float(spec.scale),
                STORE_ATTN=need_attn, FLAT_Q=_flat(q),
                **_constexprs(pb, spec, cfg, v.dtype, offset is not None, rpb is not None, int64),
            )
    return out, attn


def upsample_bwd(dout, v, size, spec: Spec, offset=None, q=None, k=None, rpb=None, wts=None, attn=None,
                 config: Config | None = None, deterministic: bool = False, force_int64: bool = False):
    """Gradients (dv, doffset, dq, dk, drpb, dwts) in the dtypes and layouts of their inputs (None
    for inputs not given). `attn` is the forward's saved softmax (attention, logits); `wts` the
    logits or weights. With deterministic, dk and dv are summed in a fixed order (sort + gather)
    instead of by atomics."""
    pb = Problem.of(v, size, q, spec)
    cfg = config or default_config(pb, backward=True)
    v_in, k_in, q_in = v, k, q
    # q and dout channels-last too: they then load in the layout of the gathered corners they meet in
    # the inner loops, instead of being converted there (through shared memory) once per neighbour
    q, k, v, dout = (_channels_last(t, cfg) for t in (q, k, v, dout))
    off_c = offset.contiguous() if offset is not None else None
    acc_t, acc_tl = _acc(v.dtype)
    dev = v.device
    P = pb.Ho * pb.Wo
    attention = spec.weights == "attention"
    saved = attn if spec.weights in ("attention", "logits") else wts.contiguous() if wts is not None else None
    dq = torch.empty_like(q_in) if attention else None
    doff = torch.empty(pb.B, 2 * pb.G * pb.K, pb.Ho, pb.Wo, dtype=acc_t, device=dev) if offset is not None else None
    n_programs = triton.cdiv(P, cfg.block_p) * pb.B
    # atomic: partial sums over a bounded number of slots; deterministic: upsample_drpb_kernel's
    drpb = torch.zeros(min(DRPB_SLOTS, n_programs), pb.NH, pb.K, pb.D // pb.NH, dtype=acc_t, device=dev) \
        if rpb is not None and not deterministic else None
    dwts = torch.empty(pb.B, pb.NH, pb.K, P, dtype=acc_t, device=dev) \
        if wts is not None or (attention and deterministic) else None
    # channels-last accumulators: a corner's atomics hit one contiguous run
    alloc = torch.empty if deterministic else torch.zeros
    dk = alloc(pb.B, pb.H, pb.W, pb.D, dtype=acc_t, device=dev).permute(0, 3, 1, 2) if attention else None
    dv = alloc(pb.B, pb.H, pb.W, pb.C, dtype=acc_t, device=dev).permute(0, 3, 1, 2)
    # -1 (outside) until the kernel writes it: the host-side sort never meets garbage, even where the
    # launch is only recorded, not run (lda_aqu/autotune/resources.py)
    tgt = torch.full((pb.B, pb.G, pb.K, 4, P), -1, dtype=torch.int32, device=dev) if deterministic else None
    cw = torch.empty(pb.B, pb.G, pb.K, 4, P, dtype=acc_t, device=dev) if deterministic else None
    int64 = force_int64 or _needs_int64(q, k, v, off_c, dout, dq, dk, dv, doff, saved, tgt)
    rpb_c = rpb.contiguous() if rpb is not None else None
    win = _window_table(pb, spec, dev)
    with _on_device(v):
        for rows in _batches(pb.B):
            q_b, k_b, v_b, off_b, saved_b, dout_b, dq_b, dk_b, dv_b, doff_b, dwts_b, tgt_b, cw_b = _rows(
                rows, q, k, v, off_c, saved, dout, dq, dk, dv, doff, dwts, tgt, cw)
            dummy = dv_b
            upsample_bwd_kernel[_grid(pb, cfg, rows)](
                q_b if q is not None else dummy, k_b if k is not None else dummy, v_b,
                off_b if off_b is not None else dummy, rpb_c if rpb_c is not None else dummy,
                saved_b if saved_b is not None else dummy, dout_b,
                dq_b if dq_b is not None else dummy, dk_b if dk_b is not None else dummy, dv_b,
                doff_b if doff_b is not None else dummy, drpb if drpb is not None else dummy,
                dwts_b if dwts_b is not None else dummy, tgt_b if tgt_b is not None else dummy,
                cw_b if cw_b is not None else dummy, win if win is not None else dummy,
                *_strides(q), *_strides(k), *v.stride(), off_c.stride(0) if off_c is not None else 0,
                *dout.stride(), *_strides(dk), *dv.stride(), *_strides(dq),
                pb.H, pb.W, pb.Ho, pb.Wo, P, *split_float(spec.scale), drpb.shape[0] if drpb is not None else 1,
                ATOMIC=not deterministic, FLAT_Q=_flat(q, dq), FLAT_DO=_flat(dout),
                **_constexprs(pb, spec, cfg, v.dtype, offset is not None, rpb is not None, int64),
            )
        if deterministic:
            dk, dv = _kv_grad_deterministic(pb, cfg, q, dout, tgt, cw, saved, dwts, acc_t, acc_tl, int64)
            if rpb is not None:
                drpb = _drpb_deterministic(pb, q, dwts, acc_t, acc_tl)
    # one pass each from the accumulators into the inputs' dtype and memory layout
    return (torch.empty_like(v_in).copy_(dv),
            torch.empty_like(offset).copy_(doff) if offset is not None else None,
            dq,
            torch.empty_like(k_in).copy_(dk) if attention else None,
            torch.empty_like(rpb).copy_(drpb.sum(0)) if rpb is not None else None,
            torch.empty_like(wts).copy_(dwts.view(wts.shape)) if wts is not None else None)


def _drpb_deterministic(pb: Problem, q, ds, acc_t, acc_tl):
    """drpb's partial sums over a bounded number of slots, each summed in a fixed order."""
    if not _flat(q):
        q = q.contiguous()
    P = pb.Ho * pb.Wo
    DH = pb.D // pb.NH
    block_p, block_d = (128, triton.next_power_of_2(DH)) if INTERPRET else (64, min(32, triton.next_power_of_2(DH)))
    units = pb.B * triton.cdiv(P, block_p)
    per_slot = max(1, triton.cdiv(units, DRPB_SLOTS))
    slots = max(1, triton.cdiv(units, per_slot))  # one, of zeros, for an empty batch
    part = torch.empty(slots, pb.NH, pb.K, DH, dtype=acc_t, device=q.device)
    upsample_drpb_kernel[(pb.NH * pb.K, triton.cdiv(DH, block_d), slots)](
        ds, q, part, q.stride(0), q.stride(1), q.stride(3), pb.B, P, triton.cdiv(P, block_p), per_slot,
        NH=pb.NH, K=pb.K, DH=DH, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc_tl, num_warps=4,
    )
    return part


def _kv_grad_deterministic(pb: Problem, cfg: Config, q, dout, tgt, cw, saved, ds, acc_t, acc_tl, int64):
    """dk and dv summed per input pixel in a fixed order from the corner records of the backward kernel."""
    HW, P = pb.H * pb.W, pb.Ho * pb.Wo
    dev = dout.device
    n_rows = pb.B * pb.G * HW
    bg = torch.arange(pb.B * pb.G, device=dev).view(pb.B, pb.G, 1, 1, 1)
    # corners outside the map sort after every pixel; no data-dependent shapes, so that the launch can
    # also be recorded on meta tensors
    key = torch.where(tgt >= 0, bg * HW + tgt, n_rows).reshape(-1)
    # a stable sort keeps (n, corner, p) order within each input pixel: the sum order is fixed
    key, src = torch.sort(key, stable=True)
    src_p = (src % P).to(torch.int32)
    src_n = (src // (4 * P) % pb.K).to(torch.int32)
    src_w = cw.reshape(-1)[src]
    row_ptr = torch.searchsorted(key, torch.arange(n_rows + 1, device=dev))
    attention = pb.weights == "attention"
    q = q.contiguous() if attention else dout
    dout = dout.contiguous()
    dk = torch.empty(pb.B, pb.D, pb.H, pb.W, dtype=acc_t, device=dev) if attention else None
    dv = torch.empty(pb.B, pb.C, pb.H, pb.W, dtype=acc_t, device=dev)
    per = pb.G * HW
    for rows in _batches(pb.B, MAX_GRID_X // per):
        q_b, dout_b, saved_b, ds_b, dk_b, dv_b = _rows(rows, q, dout, saved, ds, dk, dv)
        upsample_bwd_gather_kernel[((rows.stop - rows.start) * per,)](
            row_ptr[rows.start * per:], src_p, src_n, src_w, q_b, dout_b, saved_b if saved is not None else dv_b,
            ds_b if ds is not None else dv_b, dk_b if dk is not None else dv_b, dv_b,
            q.stride(0), q.stride(1), dout.stride(0), dout.stride(1),
            HW, P,
            D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K, HAS_W=pb.weights != "unit", HAS_K=attention,
            BLOCK_E=64 if INTERPRET else 32,
            BLOCK_D=min(cfg.block_d * 2, triton.next_power_of_2(max(pb.D // pb.G, 1))),
            BLOCK_C=min(cfg.block_c * 2, triton.next_power_of_2(pb.C // pb.G)), INT64=int64, ACC=acc_tl,
        )
    return dk, dv
