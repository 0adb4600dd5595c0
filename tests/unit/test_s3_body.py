"""How an S3 answer's body is read into the copier's buffer: straight from
the connection when it is a plain HTTP body, the documented way otherwise.
(Reads against RGW are tested on the cluster, tests/cluster/test_s3_stream.py.)"""
import http.client
import io
from typing import Dict, List

import pytest

from rbd_migration.streams.coalesce import Scatter
from rbd_migration.streams.s3 import _fill


class _Socket:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.raw)


class _Urllib3Response:
    """What botocore wraps: urllib3's response around http.client's."""

    def __init__(self, answer: bytes, headers: Dict[str, str]) -> None:
        self._fp = http.client.HTTPResponse(_Socket(answer))  # type: ignore[arg-type]
        self._fp.begin()
        self.headers = headers
        self.released: List[bool] = []

    def release_conn(self) -> None:
        self.released.append(True)


class _Body:
    def __init__(self, raw: object) -> None:
        self._raw_stream = raw

    def read(self) -> bytes:
        raise AssertionError('read straight from the connection instead')


def _answer(body: bytes, length: int) -> bytes:
    return (b'HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n' % length) + body


def test_a_plain_body_goes_straight_into_the_buffer() -> None:
    raw = _Urllib3Response(_answer(b'abcdefgh', 8), {})
    buf = bytearray(8)
    assert _fill(_Body(raw), Scatter.of(0, memoryview(buf)), 0) == 8
    assert buf == b'abcdefgh'
    assert raw.released == [True], 'the connection goes back to the pool'


def test_a_body_cut_short_is_an_incomplete_read() -> None:
    raw = _Urllib3Response(_answer(b'abc', 8), {})
    with pytest.raises(http.client.IncompleteRead):
        _fill(_Body(raw), Scatter.of(0, memoryview(bytearray(8))), 0)
    assert raw.released == []


def test_other_bodies_are_read_the_documented_way() -> None:
    class Plain:
        def read(self) -> bytes:
            return b'0123456789'

    buf = bytearray(4)
    assert _fill(Plain(), Scatter.of(0, memoryview(buf)), 0) == 4 and buf == b'0123'
    encoded = _Urllib3Response(_answer(b'zz', 2), {'Content-Encoding': 'gzip'})

    class Wrapped(_Body):
        def read(self) -> bytes:
            return b'ok'

    buf = bytearray(2)
    assert _fill(Wrapped(encoded), Scatter.of(0, memoryview(buf)), 0) == 2 and buf == b'ok'


def test_a_plain_body_goes_straight_into_every_piece_of_a_merged_read() -> None:
    raw = _Urllib3Response(_answer(b'aaXXbbbYcc', 10), {})
    a, b, c = bytearray(2), bytearray(3), bytearray(2)
    pieces = [(0, memoryview(a)), (4, memoryview(b)), (8, memoryview(c))]
    scatter = Scatter(0, pieces, [0, 1, 2], 10)
    assert _fill(_Body(raw), scatter, 0) == 10
    assert scatter.finish(10) == [2, 3, 2]
    assert (a, b, c) == (b'aa', b'bbb', b'cc'), 'the gaps are thrown away'


def test_a_resumed_answer_fills_from_where_the_last_one_stopped() -> None:
    buf = bytearray(8)
    scatter = Scatter.of(0, memoryview(buf))
    buf[:3] = b'abc'
    raw = _Urllib3Response(_answer(b'defgh', 5), {})
    assert _fill(_Body(raw), scatter, 3) == 5
    assert buf == b'abcdefgh'
