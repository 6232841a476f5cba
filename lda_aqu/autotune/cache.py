"""The persisted tuning cache: one JSON file per GPU in a user cache directory, read once, lazily.

A file names the GPU, its compute capability, the Triton version and a hash of the kernels' source
it was tuned for; one that names others, or does not parse, is ignored with one warning. Entries are
keyed by the kernel variant a launch runs and its shape bucket. `lookup` never sweeps: a missing
entry means the launcher's default, never another variant's winner.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import pkgutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import triton

from ..kernels.launchers import INTERPRET, Config, Problem, Spec
from ..kernels.layout import dtype_name

from .device import slug

ENV = "LDA_AQU_CACHE_DIR"
DEFAULTS = Path(__file__).parent / "defaults"  # committed tables for measured GPUs
# what a lookup serves: the inference forward, the training forward that also stores the softmax
# weights for the backward, the backward with atomics, the deterministic backward (whose gather
# kernel's tiles follow the configuration)
KERNELS = ("fwd", "fwd-train", "bwd", "bwd-det")

_entries: dict = {}  # file name -> entries, each file read once
_warned = False


class Variant(NamedTuple):
    """Which kernel a launch runs and what it is specialised on besides the sizes and weight mode."""
    kernel: str = "fwd"
    offset: bool = True
    rpb: bool = True
    coords: str = "align_corners"
    padding: str = "zeros"
    grid: int = 0

    @staticmethod
    def of(kernel: str, spec: Spec, offset: Optional[torch.Tensor], rpb: Optional[torch.Tensor]) -> "Variant":
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return Variant(kernel, offset is not None, rpb is not None, spec.coords, spec.padding, spec.grid)


@functools.lru_cache(maxsize=None)
def kernel_source_hash(package: str = __package__.rpartition(".")[0] + ".kernels") -> str:
    """sha256 (16 hex digits) of the source of every @triton.jit function in the package's modules:
    any edit of a kernel invalidates what was tuned for it."""
    h = hashlib.sha256()
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{package}.{info.name}")
        for name, obj in sorted(vars(mod).items()):
            fn = getattr(obj, "fn", None)  # JITFunction, or the interpreter's InterpretedFunction
            if type(obj).__module__.startswith("triton.") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                h.update(f"{mod.__name__}.{name}\n{inspect.getsource(fn)}".encode())
    return h.hexdigest()[:16]


def _gpu(device) -> bool:
    return torch.cuda.is_available() and not INTERPRET and (device is None or torch.device(device).type == "cuda")


@functools.lru_cache(maxsize=None)
def _gpu_of(index: int) -> tuple[str, str]:
    """(name, "sm_XY") of GPU `index`, asked once: lookups run before every launch."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm_{major}{minor}"


def identity(device=None) -> dict:
    """What a cache file must match: the device (`device`'s, else the current one) and the software
    that compiled for it. Interpreted kernels get an identity of their own, so that their timings
    never land in a GPU's file."""
    if _gpu(device):
        index = torch.device(device).index if device is not None else None
        gpu, cc = _gpu_of(torch.cuda.current_device() if index is None else index)
    else:
        gpu, cc = "cpu-interpreter", "none"
    return {"gpu": gpu, "capability": cc, "triton": triton.__version__, "kernels": kernel_source_hash()}


def cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lda-aqu"


def _file_name(ident: dict) -> str:
    return slug(f"{ident['gpu']}-{ident['capability']}") + ".json"


def cache_path(device=None) -> Path:
    return cache_dir() / _file_name(identity(device))


def bucket(pb: Problem, dtype: torch.dtype, variant: Variant) -> str:
    """The key of an entry: the kernel variant, what it is specialised on, and the output size to a
    power of 2."""
    size = 2 ** math.ceil(math.log2(max(pb.Ho * pb.Wo, 1)))
    v = variant
    return (f"{v.kernel}|{dtype_name(dtype)}|{pb.weights}|{'offset' if v.offset else 'no-offset'}"
            f"|{'rpb' if v.rpb else 'no-rpb'}|{v.coords}|{v.padding}|grid{v.grid}"
            f"|D{pb.D}|C{pb.C}|G{pb.G}|NH{pb.NH}|K{pb.K}|P{size}")


def _read(path: Path, ident: dict) -> dict:
    """Entries of one file, {} if it is absent; raises ValueError for a corrupt or foreign file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        header, entries = data["header"], data["entries"]
        configs = {key: Config(**cfg) for key, cfg in entries.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable tuning cache {path}: {e}") from e
    if header != ident:
        raise ValueError(f"tuning cache {path} is for {header}, not {ident}")
    return configs


def load(device=None) -> dict:
    """Committed defaults under the user's cache, for `device`; a bad file is skipped with one warning."""
    global _warned
    ident = identity(device)
    merged = {}
    for path in (DEFAULTS / _file_name(ident), cache_dir() / _file_name(ident)):
        try:
            merged.update(_read(path, ident))
        except ValueError as e:
            if not _warned:
                warnings.warn(f"{e}; ignoring it", stacklevel=3)
                _warned = True
    return merged


def lookup(pb: Problem, dtype: torch.dtype, variant: Variant, device=None) -> Optional[Config]:
    """The tuned configuration of this variant at this problem on `device` (the tensors' device, not
    the current one), or None."""
    name = _file_name(identity(device))
    if name not in _entries:
        _entries[name] = load(device)
    return _entries[name].get(bucket(pb, dtype, variant))


def store(entries: dict, timings: Optional[dict] = None, device=None) -> Path:
    """Merge entries {bucket: Config} into `device`'s file, atomically (no reader sees half a file);
    timings {bucket: {"ms", "default_ms", "rel_err"}} record what the sweep measured (`show` prints them;
    lookups never read them)."""
    ident = identity(device)
    path = cache_dir() / _file_name(ident)
    try:
        merged = _read(path, ident)
        measured = json.loads(path.read_text()).get("timings", {}) if path.exists() else {}
    except ValueError:
        merged, measured = {}, {}  # a foreign or corrupt file is replaced
    merged.update(entries)
    measured = {k: v for k, v in {**measured, **(timings or {})}.items() if k in merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"header": ident, "entries": {k: dataclasses.asdict(c) for k, c in sorted(merged.items())},
            "timings": dict(sorted(measured.items()))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _entries.pop(path.name, None)
    return path


def clear(device=None) -> bool:
    """Delete `device`'s file; whether there was one."""
    path = cache_path(device)
    _entries.pop(path.name, None)
    if path.exists():
        path.unlink()
        return True
    return False
