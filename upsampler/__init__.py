"""LDA-AQU upsampler: module, functional op and its eager reference."""
from .functional import can_run_triton, deformable_local_attention, local_upsample, select_backend
from .module import LDAAQU, LayerNormProxy
from .naive import deformable_local_attention_ref, local_upsample_ref

__all__ = ["LDAAQU", "LayerNormProxy", "deformable_local_attention", "deformable_local_attention_ref",
           "local_upsample", "local_upsample_ref",
           "can_run_triton", "select_backend"]
