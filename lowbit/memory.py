"""Keep freed CPU memory in the process while a long loop runs (glibc's allocator only).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it when freed, so each large tensor a step allocates — a batch of 224 px activations,
their gradients — is faulted in again page by page and zeroed by the kernel. On a CPU that
costs more than the arithmetic of the elementwise ops that fill it (fake quantization, ReLU6,
padding), several times over in a virtual machine. :func:`reuse_freed_memory` makes glibc take
large blocks from its heap and keep freed ones there for the next step, then restores the
defaults and returns the heap's free memory to the system. Elsewhere (another libc, macOS,
Windows, a preloaded jemalloc or tcmalloc, which cache by themselves) and where the user set
``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` it does nothing.

The process holds its peak memory until the block ends rather than returning it between
steps; the peak itself is what the loop needed anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator

# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP = 2**31 - 1  # the largest trim threshold mallopt takes: never trim while inside

_lock = threading.Lock()
_depth = 0


@functools.cache
def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return None  # the user tuned glibc already: theirs stays
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, large tensors reuse freed memory instead of fresh pages (see the
    module docstring). Nests; yields whether it took effect."""
    global _depth
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                libc.malloc_trim(0)


def reusing_freed_memory(fn):
    """Decorator: run ``fn`` inside :func:`reuse_freed_memory`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reuse_freed_memory():
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["reuse_freed_memory", "reusing_freed_memory"]
