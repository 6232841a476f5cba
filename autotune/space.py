"""The search space of each kernel, pruned before anything is timed: tiles no wider than the
problem needs, a register estimate, then ptxas's own report (no spills)."""
from __future__ import annotations

import itertools

import triton

from kernels.launchers import Config, Problem, default_config

from .resources import Job, compile_reports

FULL = dict(block_p=(16, 32, 64), block_d=(16, 32, 64), block_c=(16, 32, 64, 128), num_warps=(2, 4, 8),
            num_stages=(1, 2), channels_last=(True, False))
QUICK = dict(block_p=(16, 32), block_d=(16, 32), block_c=(16, 32, 64), num_warps=(4, 8), num_stages=(1,),
             channels_last=(True,))


def estimated_registers(pb: Problem, cfg: Config, backward: bool) -> float:
    """fp32 registers per thread of the live tiles: the [BLOCK_P, NH_PAD, K_PAD] softmax state and
    the [BLOCK_P, BLOCK] corner gathers with their 64-bit pointers (about 7 tiles forward, 14
    backward, calibrated on ptxas reports for sm_90), plus scalars."""
    state = cfg.block_p * triton.next_power_of_2(pb.NH) * triton.next_power_of_2(pb.K)
    per_head = cfg.block_p * triton.next_power_of_2(pb.K)
    gather = cfg.block_p * max(cfg.block_c, cfg.block_d)
    tiles = 4 * state + 4 * per_head + 14 * gather if backward else 2 * state + per_head + 7 * gather
    return tiles / (32 * cfg.num_warps) + 40


def candidates(pb: Problem, backward: bool = False, quick: bool = False) -> list[Config]:
    """Configurations worth compiling, the launcher's default first."""
    axes = QUICK if quick else FULL
    found = [default_config(pb, backward, interpret=False)]
    for values in itertools.product(*axes.values()):
        cfg = Config(**dict(zip(axes, values)))
        if cfg not in found and cfg.fits(pb) and estimated_registers(pb, cfg, backward) <= 255:
            found.append(cfg)
    return found


def spill_free(pb: Problem, configs: list[Config], backward: bool, dtype: str = "fp32", cc: int = 90) -> list[Config]:
    """The configurations that compile for sm_<cc> and keep everything in registers."""
    reports = compile_reports([Job("bwd" if backward else "fwd", pb, c, dtype, cc) for c in configs])
    return [c for c, r in zip(configs, reports) if r.error is None and r.spill_bytes == 0]
