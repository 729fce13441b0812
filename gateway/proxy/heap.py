"""Keeping freed buffers in the process, so the proxy's byte copies reuse warm memory.

Every proxied body passes through Python buffers of up to a few hundred KiB each
(asyncio's 256 KiB socket reads, aiohttp's payload pieces, joined reads). glibc's malloc
serves blocks of that size by ``mmap`` until its adaptive threshold catches up, and
gives the top of the heap back to the kernel whenever more than twice that threshold is
free. Under a stream of 1 MiB range requests the gateway thus faulted in 35-90 fresh
pages (4 KiB each) per request, and first-touch memory is slow on the VMs this runs on
(≈ 1 GB/s): measured, ≈ 18 % of the gateway's CPU per proxied 1 MiB range went to it.

``keep_freed_buffers`` fixes the two thresholds: blocks up to ``MMAP_THRESHOLD_BYTES``
come from the heap, and up to ``TRIM_THRESHOLD_BYTES`` of free heap is kept for the next
request rather than returned. The cost is that much resident memory the process may hold
after a burst, small beside what the streams in flight hold anyway. Elsewhere than glibc
(no ``mallopt``) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

# Larger than any buffer the proxy path allocates (reads are at most 2 x 256 KiB).
MMAP_THRESHOLD_BYTES: Final = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES: Final = 64 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Sets the two malloc thresholds for this process; whether the C library took them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 on error.
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not done:
        logger.warning("malloc kept its thresholds; proxied bodies will fault in fresh pages")
    return done
