"""Keep the copy's 4 MiB buffers in the heap instead of the kernel's hands.

Every chunk a copy reads is a fresh ``bytes`` of up to 4 MiB (python3-rbd
and the streams allocate one per read).  glibc serves blocks that large with
mmap and unmaps them on free -- or trims them off the top of the heap -- so
each chunk costs about a thousand page faults and the kernel zeroing 4 MiB
again: most of the mgr's CPU during a dense copy, in librbd's deep copy as in
ours.  Raising glibc's mmap and trim thresholds lets freed buffers be reused.

The setting is process-wide (the mgr is one process shared by all modules),
so it is a module option, applied when a copy starts; at most ``trim`` bytes
of free memory stay mapped per malloc arena.  glibc cannot be told to go
back to its adaptive thresholds, so turning the option off takes a mgr
restart.
"""
import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

#: mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 128 << 20

_lock = threading.Lock()
_applied = False


def keep_copy_buffers() -> bool:
    """Raise glibc's thresholds once per process; whether they are raised."""
    global _applied
    with _lock:
        if not _applied:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
                _applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            except (OSError, AttributeError) as e:  # not glibc
                log.info('cannot tune malloc thresholds: %s', e)
            if _applied:
                log.info('malloc: mmap threshold %d MiB, trim threshold %d MiB',
                         MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
        return _applied


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim).

    A copy frees hundreds of MiB of 4 MiB buffers when it ends, but glibc
    keeps what is free inside its arenas mapped, so the mgr's resident
    memory would stay at the copies' high-water mark for good."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.malloc_trim(0)
    except (OSError, AttributeError) as e:  # not glibc
        log.debug('cannot trim the heap: %s', e)
