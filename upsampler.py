"""`upsampler`, the checkout's former import name, as an alias of `lda_aqu.upsampler` for tools that
still import it from the repository root (../shared/tools/kernel_sass.py). Not installed: the wheel's
only top-level package is `lda_aqu`. Each submodule is the installed one, not a second copy, so the
custom ops register once."""
import importlib
import pkgutil
import sys

import lda_aqu.upsampler as _package

for _info in pkgutil.iter_modules(_package.__path__):
    sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"{_package.__name__}.{_info.name}")
sys.modules[__name__] = _package
