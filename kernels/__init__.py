"""Triton kernels for local sampling upsamplers (LDA-AQU, CARAFE, DySample, interpolation) and their launchers."""
from .launchers import INTERPRET, KERNEL_VERSION, Config, Problem, Spec, default_config, upsample_bwd, upsample_fwd

__all__ = ["INTERPRET", "KERNEL_VERSION", "Config", "Problem", "Spec", "default_config", "upsample_bwd",
           "upsample_fwd"]
