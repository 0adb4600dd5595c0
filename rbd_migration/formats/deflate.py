"""Deflate streams inflated whole, with libdeflate where the host has it.

A compressed qcow2 cluster and a streamOptimized VMDK grain are each one
whole deflate stream of known output size: what libdeflate (Debian's
``libdeflate0``) decodes in one call, about twice as fast as zlib's
streaming inflate, into the caller's buffer and with the interpreter lock
released (through ctypes).  Decoding is most of a compressed import's CPU
(measured: three quarters of the view's in a live import of a compressed
qcow2), on both the live and the hidden path.

libdeflate accepts only a stream that ends within the bytes given and
fills at most the room given.  QEMU also accepts a qcow2 cluster whose
stream fills the cluster without ending, and a VMDK grain whose Adler-32
is wrong passes zlib when the output fills before it: whatever libdeflate
does not decode is decoded again by zlib, as before.  One difference is
left: zlib with QEMU's 4 KiB window refuses back-references reaching
further, which QEMU never writes; libdeflate decodes them.  Without the
library, zlib alone.
"""
import ctypes
import ctypes.util
import threading
import zlib
from typing import Any, Optional, Union

Bytes = Union[bytes, bytearray, memoryview]

_SUCCESS = 0


class _Library:
    """libdeflate's decompression calls; one decompressor per thread (a
    decompressor is not safe to share)."""

    def __init__(self, lib: Any) -> None:
        lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
        lib.libdeflate_alloc_decompressor.argtypes = []
        lib.libdeflate_free_decompressor.restype = None
        lib.libdeflate_free_decompressor.argtypes = [ctypes.c_void_p]
        for name in ('libdeflate_deflate_decompress_ex', 'libdeflate_zlib_decompress_ex'):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        self.lib = lib
        self.raw = lib.libdeflate_deflate_decompress_ex
        self.wrapped = lib.libdeflate_zlib_decompress_ex
        self._local = threading.local()

    def decompressor(self) -> int:
        handle: Optional[_Handle] = getattr(self._local, 'handle', None)
        if handle is None:
            handle = self._local.handle = _Handle(self.lib)
        return handle.ptr

    def into(self, fn: Any, data: Bytes, out: memoryview) -> Optional[int]:
        """Bytes written to ``out`` by one whole stream in ``data``; None
        where libdeflate refuses it (the caller asks zlib)."""
        dst = (ctypes.c_char * len(out)).from_buffer(out)
        used, made = ctypes.c_size_t(), ctypes.c_size_t()
        result = fn(self.decompressor(), _pointer(data), len(data), dst, len(out),
                    ctypes.byref(used), ctypes.byref(made))
        return made.value if result == _SUCCESS else None


def _pointer(data: Bytes) -> Any:
    """``data`` as ctypes passes it, without a copy where it can."""
    if isinstance(data, bytes):
        return data
    try:
        return (ctypes.c_char * len(data)).from_buffer(data)
    except TypeError:               # a read-only view
        return bytes(data)


class _Handle:
    """A decompressor, freed with the thread that made it."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.ptr = lib.libdeflate_alloc_decompressor()
        if not self.ptr:
            raise MemoryError('libdeflate: no memory for a decompressor')

    def __del__(self) -> None:
        self.lib.libdeflate_free_decompressor(self.ptr)


def _load() -> Optional[_Library]:
    try:
        return _Library(ctypes.CDLL(ctypes.util.find_library('deflate') or 'libdeflate.so.0'))
    except (OSError, AttributeError):
        return None


LIBRARY = _load()


def inflate_raw_into(data: Bytes, out: memoryview, window_bits: int = 12) -> int:
    """Raw deflate (no header) in ``data`` written to ``out``, at most
    ``len(out)`` bytes, as ``zlib.decompressobj(-window_bits).decompress(
    data, len(out))`` gives them (ValueError where zlib fails); the count
    of bytes written."""
    if LIBRARY is not None:
        made = LIBRARY.into(LIBRARY.raw, data, out)
        if made is not None:
            return made
    try:
        got = zlib.decompressobj(-window_bits).decompress(data, len(out))
    except zlib.error as e:
        raise ValueError(f'deflate: {e}') from None
    out[:len(got)] = got
    return len(got)


def inflate_zlib_into(data: Bytes, out: memoryview) -> int:
    """A zlib stream (header, deflate, Adler-32) written to ``out``, at most
    ``len(out)`` bytes: ``zlib.decompressobj().decompress(data, len(out))``
    (ValueError where zlib fails); the count of bytes written."""
    if LIBRARY is not None:
        made = LIBRARY.into(LIBRARY.wrapped, data, out)
        if made is not None:
            return made
    try:
        got = zlib.decompressobj().decompress(data, len(out))
    except zlib.error as e:
        raise ValueError(f'zlib: {e}') from None
    out[:len(got)] = got
    return len(got)
