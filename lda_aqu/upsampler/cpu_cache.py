"""Large CPU buffers of the native path kept for reuse, so that a map's second call touches no new page.

glibc hands every block over 32 MiB straight from the kernel (mmap) and gives it back on free, so each
call on a large map pays a first-touch page fault every 4 KiB of each fresh tensor: about 2 us a page
on "CPU (AMD EPYC), 2 cores", about a quarter of the forward at 1024x1024 (BENCHMARKS.md, the cache off
against on). torch keeps no CPU
cache of its own. This one is the library's, not the process's (GLIBC_TUNABLES or mallopt would change
every allocation in the process):

- blocks of 1 MiB and more, floating dtypes, exact sizes only (a tensor's storage is exactly its bytes);
- a block goes out as a tensor over a ctypes view of it (torch.frombuffer), so the tensor's storage is
  its own (use counts, autograd's in-place sums and share_memory_ behave as for torch.empty), and the
  block is free again when that storage is freed, whoever held it last (views, autograd, numpy); unlike
  torch.empty's, that storage cannot be resized;
- at most LDA_AQU_CPU_CACHE_GIB (default a quarter of physical memory) live and free together: past it,
  free blocks go, oldest first, then tensors come from torch.empty. 0 turns the cache off;
- a free block not taken again within AGE takes goes (the sizes of a map no longer run), and
  `release()` gives every free block back.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
import weakref
from typing import Optional

import torch

from .dispatch import traced

MIN_BYTES = 1 << 20  # smaller blocks come from glibc's heap, which keeps them
AGE = 256  # a block freed this many takes ago and not taken since goes (a step takes a few dozen)


@functools.lru_cache(maxsize=None)
def _default_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def limit() -> int:
    """Bytes the cache may hold, live and free (LDA_AQU_CPU_CACHE_GIB, read at each call)."""
    gib = os.environ.get("LDA_AQU_CPU_CACHE_GIB")
    if gib is None or gib == "":
        return _default_limit()
    try:
        value = float(gib)
    except ValueError:
        raise ValueError(f"LDA_AQU_CPU_CACHE_GIB must be a number of GiB (0: no cache), got {gib!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"LDA_AQU_CPU_CACHE_GIB must be a finite number >= 0, got {gib!r}")
    return int(value * 2 ** 30)


class _Block:
    __slots__ = ("storage", "nbytes", "used")

    def __init__(self, nbytes: int):
        self.storage = torch.empty(nbytes, dtype=torch.uint8, device="cpu").untyped_storage()
        self.nbytes, self.used = nbytes, 0


_lock = threading.Lock()  # for _take; the free lists' appends (from any thread's frees) need only the GIL
_free: dict[int, list[_Block]] = {}
_held = 0  # bytes of every block, live and free
_clock = 0


def _reset_after_fork():
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def _give_back(b: _Block):
    b.used = _clock
    _free.setdefault(b.nbytes, []).append(b)


def _evict(nbytes: int, before: float = math.inf) -> int:
    """Drop free blocks, oldest first, until nbytes are gone, and every block freed before `before`;
    the bytes dropped."""
    global _held
    gone = 0
    # copies: another thread's free may append meanwhile (only the GIL guards _give_back)
    for b in sorted((b for bs in list(_free.values()) for b in list(bs)), key=lambda b: b.used):
        if gone >= nbytes and b.used >= before:
            break
        _free[b.nbytes].remove(b)  # takes hold the lock too: b is still there
        gone += b.nbytes
    _held -= gone
    return gone


def _take(nbytes: int, cap: int) -> Optional[_Block]:
    global _held, _clock
    _clock += 1
    if _clock % AGE == 0:  # sizes no longer asked for (another map) go
        _evict(0, _clock - AGE)
    try:
        b = _free.get(nbytes, []).pop()
    except IndexError:
        if _held + nbytes > cap:
            _evict(_held + nbytes - cap)
            if _held + nbytes > cap:
                return None
        b = _Block(nbytes)
        _held += nbytes
    return b


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device="cpu"), contiguous, from a free cached block where one fits
    (floating dtypes)."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= MIN_BYTES and dtype.is_floating_point:
        cap = limit()
        if cap:
            with _lock:
                b = _take(nbytes, cap)
            if b is not None:
                view = (ctypes.c_char * nbytes).from_address(b.storage.data_ptr())
                weakref.finalize(view, _give_back, b).atexit = False
                # set_, not view: a view would keep the flat tensor, and with it a second use of the storage
                storage = torch.frombuffer(view, dtype=dtype).untyped_storage()
                out = torch.empty(0, dtype=dtype, device="cpu").set_(storage, 0, shape)
                # as torch.empty: deterministic mode fills what it hands out
                if torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory:
                    out.fill_(float("nan"))
                return out
    return torch.empty(shape, dtype=dtype, device="cpu")


def release() -> int:
    """Give every free block back to the system; returns the bytes the cache still holds (live blocks)."""
    with _lock:
        _evict(_held)
        return _held


def stats() -> dict:
    """{"held": bytes of all blocks, live and free, "free": bytes of the free ones}."""
    return dict(held=_held, free=sum(b.nbytes for bs in list(_free.values()) for b in list(bs)))


def empty_like_on(shape, like: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of like's dtype and device; eager CPU ones from the cache (a graph being
    captured, or a dispatch mode, must see the allocation as torch's own)."""
    if like.device.type == "cpu" and not traced():
        return empty(shape, like.dtype)
    return like.new_empty(shape)
