"""Offline tuning of the kernels' launch configurations, and the per-GPU cache the launchers read."""
