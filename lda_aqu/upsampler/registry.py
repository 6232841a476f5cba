"""Registration in mmengine's root MODELS registry, so mmdet/mmseg configs build the modules by type name.
mmengine is optional: without it nothing happens."""
from __future__ import annotations

import warnings

from .carafe import CARAFE
from .dysample import DySample
from .fpn import FPN
from .module import LDAAQU
from .necks import FPN_LAU, FPN_UPSAMPLE

# "UpsamplerFPN" because mmdet's child registry has its own "FPN", which a child's lookup finds before
# it falls back to the root; the released detectors' necks under their own names (mmdet has neither)
NAMES = {"LDAAQU": LDAAQU, "CARAFE": CARAFE, "DySample": DySample, "UpsamplerFPN": FPN, "FPN_LAU": FPN_LAU,
         "FPN_UPSAMPLE": FPN_UPSAMPLE}


def register_mmengine() -> bool:
    """Register every module of NAMES in mmengine.registry.MODELS; False when mmengine is not installed.
    A name that something else already holds keeps its owner (with a warning)."""
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return False
    for name, cls in NAMES.items():
        held = MODELS.module_dict.get(name)
        if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
            warnings.warn(f"mmengine's MODELS already holds {name!r} ({held.__module__}.{held.__qualname__}); "
                          f"lda-aqu's {cls.__qualname__} is not registered under it", stacklevel=2)
            continue
        MODELS.register_module(name=name, module=cls, force=True)  # force: a reload replaces our own entry
    return True
