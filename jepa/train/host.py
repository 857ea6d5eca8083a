"""Host-side settings of the training process that are not part of the model's arithmetic.

**CPU allocator.** glibc's ``malloc`` serves every allocation above its mmap threshold (128 KB,
raised as it goes to at most 32 MB) with a fresh ``mmap``, and returns it with ``munmap`` when it is
freed. A training step allocates and frees activations of tens of MB. So every step pays the kernel
again to fault in and zero those pages. ``benchmarks/cpu_allocator.py`` runs both settings as
alternating subprocesses (machine D of ``docs/performance.md``). With the tuned allocator, a ViT-S/16
step at batch 32 took 0.85x the time in fp32 and 0.77x in bf16. The CIFAR recipe at batch 64 took
0.83x in bf16 and 0.97x in fp32, which is within that machine's noise.

``tune_cpu_malloc`` keeps freed memory in the process instead. It turns off mmap for allocations
(``M_MMAP_MAX = 0``) and trimming of the heap (``M_TRIM_THRESHOLD``). After the first step, the
allocator reuses pages that are already mapped. The cost is that the resident memory stays at its
peak. The peak itself grew by 1-6% in the same runs (ViT-S bf16: 3,695 -> 3,898 MB); the memory is
just not handed back to the system between steps. The setting is process-wide and stays on once set.

These are the settings that PyTorch's CPU tuning guides get from jemalloc or tcmalloc. Here they
come from the libc that is already loaded, through ``mallopt``, so nothing is installed and nothing
needs ``LD_PRELOAD``. Where the libc is not glibc (macOS, musl), the call does nothing.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4

_tuned = False


def tune_cpu_malloc() -> bool:
    """Keep freed heap memory mapped for reuse (glibc only). Returns whether the settings are in effect.
    Process-wide and idempotent; DataLoader workers forked afterwards inherit them."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _tuned


def apply_cpu_allocator(setting: str, device_type: str) -> str:
    """``train.cpu_allocator`` for a run on ``device_type``: tune if asked and on CPU, and return what is
    in effect, ``"tuned"`` or ``"system"``. The setting is process-wide, so a ``"system"`` run after a
    tuned one in the same process reports ``"tuned"``."""
    if setting == "tuned" and device_type == "cpu":
        tune_cpu_malloc()
    return "tuned" if _tuned else "system"
