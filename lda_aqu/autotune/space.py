"""The search space of each kernel, pruned before anything is timed: tiles no wider than the
problem needs, a register estimate, then ptxas's own report of the launches as the JIT compiles
them (no spills)."""
from __future__ import annotations

import itertools

import triton

from ..kernels.launchers import Config, Problem

from .resources import evaluate

BLOCK_P = (16, 32, 64, 128)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (1, 2)
# ptxas's per-thread cap. Calibration: of 87 configurations compiled for sm_90 (D=64, C=256, k_u 3..9,
# G 1..2, nh 1..2, 2..8 warps), none that ptxas kept spill-free is estimated above it, and 37 of the
# 46 that spill are
MAX_REGISTERS = 255


def _widths(segment: int, cap: int | None = None) -> tuple[int, ...]:
    """Channel chunks: powers of two from 16 (or the whole segment, if narrower) up to the segment."""
    top = triton.next_power_of_2(segment) if cap is None else min(triton.next_power_of_2(segment), cap)
    return tuple(1 << i for i in range(min(4, top.bit_length() - 1), top.bit_length()))


def unpruned(pb: Problem, quick: bool = False) -> list[Config]:
    """Every configuration of the grid for this problem; the launchers' defaults are among them."""
    d, c = pb.widest_segment(pb.D), pb.widest_segment(pb.C)
    axes = dict(block_p=BLOCK_P, block_d=_widths(d), block_c=_widths(c), num_warps=NUM_WARPS,
                num_stages=NUM_STAGES, channels_last=(True, False))
    if quick:
        axes.update(block_p=(16, 32, 64), block_d=_widths(d, 32), block_c=_widths(c, 64), num_warps=(4, 8),
                    num_stages=(1,), channels_last=(True,))
    return [Config(*values) for values in itertools.product(*axes.values())]


def estimated_registers(pb: Problem, cfg: Config, backward: bool) -> float:
    """fp32 registers per thread of the live tiles: the [BLOCK_P, NH_PAD, K_PAD] softmax state and
    the [BLOCK_P, BLOCK] channel tiles (q or the accumulator, four corners, their blend, with
    64-bit corner pointers), plus scalars and addresses. The forward's state is one tile (logits,
    then attention in place); the backward keeps attention, its gradient, the offset gradients and
    twice the channel tiles (values and dout, the scatter). Calibrated on ptxas reports for sm_90."""
    state = cfg.block_p * triton.next_power_of_2(pb.NH) * triton.next_power_of_2(pb.K)
    per_head = cfg.block_p * triton.next_power_of_2(pb.K)
    tile = cfg.block_p * max(cfg.block_c, cfg.block_d)
    live = 4 * state + 4 * per_head + 14 * tile if backward else state + 7 * tile
    return live / (32 * cfg.num_warps) + 40


def candidates(pb: Problem, backward: bool = False, quick: bool = False) -> list[Config]:
    """Configurations worth compiling: they fit the problem and the register estimate."""
    return [c for c in unpruned(pb, quick) if c.fits(pb) and estimated_registers(pb, c, backward) <= MAX_REGISTERS]


def spill_free(pb: Problem, configs: list[Config], backward: bool, dtype: str = "fp32", cc: int = 90,
               deterministic: bool = False) -> list[Config]:
    """The configurations whose every launch (the forward's inference and training launches, or the
    backward's, atomic or deterministic) compiles for sm_<cc>, specialised as the JIT would at this
    problem, and keeps everything in registers."""
    found = evaluate(pb, dtype, "bwd" if backward else "fwd", configs, cc, deterministic)
    return [c for c, reports in zip(configs, found) if all(r.spill_free for r in reports)]
