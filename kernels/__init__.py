"""Triton kernels for offset-sampled neighbour gathering and softmax aggregation, and their launchers."""
from .launchers import INTERPRET, KERNEL_VERSION, Config, Problem, default_config, dla_bwd, dla_fwd

__all__ = ["INTERPRET", "KERNEL_VERSION", "Config", "Problem", "default_config", "dla_bwd", "dla_fwd"]
