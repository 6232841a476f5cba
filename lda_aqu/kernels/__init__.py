"""Triton kernels for local sampling upsamplers (LDA-AQU, CARAFE, DySample, interpolation) and their launchers;
`kernels.cpu`: the same op's native CPU kernels (C++, built on first use)."""

__all__ = ["INTERPRET", "Config", "Problem", "Spec", "default_config", "upsample_bwd",
           "upsample_fwd"]


def __getattr__(name):
    # lazy: kernels.layout (plain torch) is imported by the torch path, which must not need Triton
    if name in __all__:
        from . import launchers
        return getattr(launchers, name)
    raise AttributeError(f"module 'lda_aqu.kernels' has no attribute {name!r}")
