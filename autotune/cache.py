"""The persisted tuning cache: one JSON file per GPU in a user cache directory, read once, lazily.

A file names the GPU, its compute capability, the Triton version and the kernel version it was
tuned for; one that names others, or does not parse, is ignored with one warning. Entries are
keyed by shape bucket. `lookup` never sweeps: a missing entry means the launcher's default.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import triton

from kernels.launchers import INTERPRET, KERNEL_VERSION, Config, Problem
from kernels.layout import dtype_name

ENV = "LDA_AQU_CACHE_DIR"
DEFAULTS = Path(__file__).parent / "defaults"  # committed tables for measured GPUs

_entries: Optional[dict] = None
_warned = False


def identity() -> dict:
    """What a cache file must match: the device and the software that compiled for it. Interpreted
    kernels get an identity of their own, so that their timings never land in a GPU's file."""
    if torch.cuda.is_available() and not INTERPRET:
        major, minor = torch.cuda.get_device_capability()
        gpu, cc = torch.cuda.get_device_name(), f"sm_{major}{minor}"
    else:
        gpu, cc = "cpu-interpreter", "none"
    return {"gpu": gpu, "capability": cc, "triton": triton.__version__, "kernel_version": KERNEL_VERSION}


def cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lda-aqu"


def _file_name(ident: dict) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{ident['gpu']}-{ident['capability']}").strip("-").lower() + ".json"


def cache_path() -> Path:
    return cache_dir() / _file_name(identity())


def bucket(pb: Problem, dtype: torch.dtype, backward: bool) -> str:
    """The key of an entry: what the kernel is specialised on, and the output size to a power of 2."""
    size = 2 ** math.ceil(math.log2(max(pb.Ho * pb.Wo, 1)))
    return (f"{'bwd' if backward else 'fwd'}|{dtype_name(dtype)}|D{pb.D}|C{pb.C}|G{pb.G}|NH{pb.NH}"
            f"|K{pb.K}|{pb.weights}|P{size}")


def _read(path: Path) -> dict:
    """Entries of one file, {} if it is absent; raises ValueError for a corrupt or foreign file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        header, entries = data["header"], data["entries"]
        configs = {key: Config(**cfg) for key, cfg in entries.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable tuning cache {path}: {e}") from e
    if header != identity():
        raise ValueError(f"tuning cache {path} is for {header}, not {identity()}")
    return configs


def load() -> dict:
    """Committed defaults under the user's cache; a bad file is skipped with one warning."""
    global _warned
    merged = {}
    for path in (DEFAULTS / _file_name(identity()), cache_path()):
        try:
            merged.update(_read(path))
        except ValueError as e:
            if not _warned:
                warnings.warn(f"{e}; ignoring it", stacklevel=3)
                _warned = True
    return merged


def lookup(pb: Problem, dtype: torch.dtype, backward: bool = False) -> Optional[Config]:
    global _entries
    if _entries is None:
        _entries = load()
    return _entries.get(bucket(pb, dtype, backward))


def store(entries: dict, timings: Optional[dict] = None) -> Path:
    """Merge entries {bucket: Config} into this device's file, atomically (no reader sees half a file);
    timings {bucket: {"ms", "default_ms", "rel_err"}} record what the sweep measured (`show` prints them;
    lookups never read them)."""
    global _entries
    path = cache_path()
    try:
        merged = _read(path)
        measured = json.loads(path.read_text()).get("timings", {}) if path.exists() else {}
    except ValueError:
        merged, measured = {}, {}  # a foreign or corrupt file is replaced
    merged.update(entries)
    measured = {k: v for k, v in {**measured, **(timings or {})}.items() if k in merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"header": identity(), "entries": {k: dataclasses.asdict(c) for k, c in sorted(merged.items())},
            "timings": dict(sorted(measured.items()))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _entries = None
    return path


def clear() -> bool:
    """Delete this device's file; whether there was one."""
    global _entries
    _entries = None
    path = cache_path()
    if path.exists():
        path.unlink()
        return True
    return False
