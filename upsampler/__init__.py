"""LDA-AQU upsampler: module, functional op and its eager reference."""
from .functional import can_run_triton, deformable_local_attention, select_backend
from .module import LDAAQU, LayerNormProxy
from .naive import deformable_local_attention_ref

__all__ = ["LDAAQU", "LayerNormProxy", "deformable_local_attention", "deformable_local_attention_ref",
           "can_run_triton", "select_backend"]
