"""Whole-stream inflation: libdeflate's answers are zlib's, and whatever
libdeflate refuses is left to zlib, as QEMU's reading would have it."""
import ctypes.util
import random
import zlib
from typing import Iterator, Optional

import pytest

from rbd_migration.formats import deflate

CLUSTER = 64 << 10


@pytest.fixture(params=['libdeflate', 'zlib'])
def library(request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Optional[object]]:
    """Each test with the library the host has, and without it."""
    if request.param == 'libdeflate':
        if deflate.LIBRARY is None:
            pytest.skip('libdeflate0 is not installed')
    else:
        monkeypatch.setattr(deflate, 'LIBRARY', None)
    yield deflate.LIBRARY


def test_libdeflate_is_used_where_the_host_has_it() -> None:
    assert (deflate.LIBRARY is not None) == bool(ctypes.util.find_library('deflate'))


def _text(rng: random.Random, n: int) -> bytes:
    words = [rng.randbytes(rng.randrange(1, 9)) for _ in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(16)
    return bytes(out[:n])


def _raw_deflate(data: bytes, window_bits: int = 12) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize('seed', range(6))
def test_clusters_as_qemu_writes_them_inflate_as_zlib_inflates_them(
        library: Optional[object], seed: int) -> None:
    """Compressible and random clusters, each followed by the next
    cluster's bytes (QEMU's compressed size is rounded up to sectors)."""
    rng = random.Random(seed)
    for _ in range(20):
        cluster = _text(rng, CLUSTER) if rng.random() < 0.7 else rng.randbytes(CLUSTER)
        stored = _raw_deflate(cluster) + rng.randbytes(rng.randrange(0, 512))
        out = bytearray(CLUSTER)
        for data in (stored, bytearray(stored), memoryview(stored)):
            assert deflate.inflate_raw_into(data, memoryview(out)) == CLUSTER
            assert out == cluster == zlib.decompressobj(-12).decompress(stored, CLUSTER)


def test_a_stream_longer_than_the_cluster_gives_its_first_cluster(
        library: Optional[object]) -> None:
    """QEMU accepts a stream that fills the cluster without ending (its
    inflate stops at the cluster's end); libdeflate refuses it, zlib
    answers."""
    data = _text(random.Random(1), 2 * CLUSTER)
    out = bytearray(CLUSTER)
    assert deflate.inflate_raw_into(_raw_deflate(data), memoryview(out)) == CLUSTER
    assert out == data[:CLUSTER]


def test_a_stream_that_ends_early_says_how_much_it_made(library: Optional[object]) -> None:
    data = _text(random.Random(2), CLUSTER // 2)
    out = bytearray(CLUSTER)
    assert deflate.inflate_raw_into(_raw_deflate(data), memoryview(out)) == CLUSTER // 2
    assert out[:CLUSTER // 2] == data


@pytest.mark.parametrize('seed', range(4))
def test_damaged_streams_fail_as_zlib_fails_them(library: Optional[object], seed: int) -> None:
    """A damaged stream is a ValueError exactly where zlib refuses it, and
    otherwise what zlib makes of it."""
    rng = random.Random(seed)
    for _ in range(40):
        stored = bytearray(_raw_deflate(_text(rng, CLUSTER)))
        for _ in range(rng.randrange(1, 4)):
            stored[rng.randrange(len(stored))] ^= 1 << rng.randrange(8)
        try:
            want: Optional[bytes] = zlib.decompressobj(-12).decompress(bytes(stored), CLUSTER)
        except zlib.error:
            want = None
        out = bytearray(CLUSTER)
        if want is None:
            with pytest.raises(ValueError):
                deflate.inflate_raw_into(stored, memoryview(out))
        else:
            made = deflate.inflate_raw_into(stored, memoryview(out))
            assert bytes(out[:made]) == want


def test_vmdk_grains_inflate_as_zlib_inflates_them(library: Optional[object]) -> None:
    rng = random.Random(5)
    for _ in range(20):
        grain = _text(rng, CLUSTER)
        stored = zlib.compress(grain) + rng.randbytes(rng.randrange(0, 512))
        out = bytearray(CLUSTER)
        assert deflate.inflate_zlib_into(memoryview(stored), memoryview(out)) == CLUSTER
        assert out == grain
    with pytest.raises(ValueError):
        deflate.inflate_zlib_into(b'\x78\x9c' + rng.randbytes(100), memoryview(bytearray(CLUSTER)))
