"""lda-aqu: the LDA-AQU upsampler and its family on one op, with fused Triton kernels.

`lda_aqu.upsampler` holds the modules and the op (re-exported here), `lda_aqu.kernels` the Triton
and native CPU kernels, `lda_aqu.autotune` the offline tuning."""
from .upsampler import *  # noqa: F401,F403
from .upsampler import __all__  # noqa: F401
from .upsampler import __getattr__  # noqa: F401
