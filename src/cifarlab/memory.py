"""glibc malloc settings for training and for the app's server (cifarlab's commands call this first)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys


def tune_malloc(server: bool = False) -> None:
    """glibc settings. Training: keep freed memory instead of returning it to the OS after every step (about 20%
    faster on CPU; = MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 MALLOC_TOP_PAD_=1 GiB). A server
    (``server=True``): two malloc arenas, so the web server's many worker threads do not each grow an arena of
    their own (measured in benchmarks/app_load.py). A no-op where glibc is not the C library, and with
    ``CIFARLAB_MALLOC_TUNING=0`` in the environment.
    """
    if os.environ.get("CIFARLAB_MALLOC_TUNING", "1") == "0":
        return
    libc_name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8  # from <malloc.h>
        if server:
            libc.mallopt(m_arena_max, 2)
            return
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
        libc.mallopt(m_top_pad, 1 << 30)
    except (OSError, AttributeError):
        pass  # not glibc (e.g. musl): keep the defaults
