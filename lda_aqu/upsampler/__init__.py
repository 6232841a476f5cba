"""LDA-AQU upsampler and its family (CARAFE, DySample, SAPA, SAPADeform, FADE, interpolation) on one op; an
FPN neck; the necks of the released LDA-AQU and DySample detectors."""
from .anyup import AnyUp
from .carafe import CARAFE
from .dysample import DySample
from .fpn import FPN
from .guided import FADE, SAPA, SAPADeform
from .functional import can_run_triton, deformable_local_attention, local_upsample, select_backend
from .interpolation import interpolate
from .layernorm import LayerNormProxy
from .module import LDAAQU
from .naf import NAF
from .necks import FPN_LAU, FPN_UPSAMPLE, neck_state_dict
from .naive import deformable_local_attention_ref, local_upsample_ref
from .registry import register_mmengine

__all__ = ["LDAAQU", "AnyUp", "NAF", "LayerNormProxy", "CARAFE", "DySample", "SAPA", "SAPADeform", "FADE", "FPN",
           "FPN_LAU", "FPN_UPSAMPLE", "neck_state_dict",
           "interpolate",
           "deformable_local_attention", "deformable_local_attention_ref", "local_upsample", "local_upsample_ref",
           "can_run_triton", "select_backend", "register_mmengine", "profile", "count_flops", "op_flops"]


def __getattr__(name):
    # lazy: upsampler.flops imports the Triton custom ops to register their FLOP formulas
    if name in ("profile", "count_flops", "op_flops"):
        from . import flops
        return getattr(flops, name)
    raise AttributeError(f"module 'lda_aqu.upsampler' has no attribute {name!r}")

register_mmengine()
