"""RawFormat: the stream is the disk; snapshots are whole raw images."""
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest

from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument, NotFound
from rbd_migration.formats import open_format
from rbd_migration.formats.base import Extent, ExtentKind, Snapshot
from rbd_migration.formats.raw import EXTENT_PIECE, RawFormat

MiB = 1 << 20


def stream(path: Path) -> Dict[str, Any]:
    return {'type': 'file', 'file_path': str(path)}


def raw_spec(head: Path, snaps: Sequence[Path] = ()) -> Dict[str, Any]:
    spec: Dict[str, Any] = {'type': 'raw', 'stream': stream(head)}
    if snaps:
        spec['snapshots'] = [{'type': 'raw', 'name': p.stem,
                              'stream': stream(p)} for p in snaps]
    return spec


def open_spec(spec: Dict[str, Any], root: Path) -> RawFormat:
    fmt = open_format(spec, SourceContext(allowed_file_roots=[str(root)]))
    assert isinstance(fmt, RawFormat)
    return fmt


def write(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def test_head_reads_and_size(tmp_path: Path) -> None:
    data = write(tmp_path / 'disk.img', 300_000, 1)
    with open_spec(raw_spec(tmp_path / 'disk.img'), tmp_path) as fmt:
        assert fmt.size() == len(data)
        assert fmt.snapshots() == []
        assert fmt.read(0, len(data)) == data
        assert fmt.read(123_457, 65_536) == data[123_457:188_993]
        assert not fmt.features.compressed and not fmt.features.encrypted


def test_read_past_end_is_zero_filled(tmp_path: Path) -> None:
    data = write(tmp_path / 'disk.img', 10_000, 2)
    with open_spec(raw_spec(tmp_path / 'disk.img'), tmp_path) as fmt:
        assert fmt.read(9_990, 30) == data[-10:] + bytes(20)
        assert fmt.read(20_000, 5) == bytes(5)
        assert fmt.read(0, 0) == b''
        with pytest.raises(ValueError):
            fmt.read(-1, 5)


def test_extents_cover_everything_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / 'big.img'
    size = 3 * EXTENT_PIECE + 12345
    with open(path, 'wb') as f:       # dense: every piece holds data
        for _ in range(size // MiB):
            f.write(b'\x01' * MiB)
        f.write(b'\x01' * (size % MiB))
    with open_spec(raw_spec(path), tmp_path) as fmt:
        extents = list(fmt.extents())
    assert EXTENT_PIECE == 64 * MiB
    assert extents == [
        Extent(0, EXTENT_PIECE, ExtentKind.DATA),
        Extent(EXTENT_PIECE, EXTENT_PIECE, ExtentKind.DATA),
        Extent(2 * EXTENT_PIECE, EXTENT_PIECE, ExtentKind.DATA),
        Extent(3 * EXTENT_PIECE, 12345, ExtentKind.DATA)]


def test_holes_of_a_sparse_file_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / 'sparse.img'
    with open(path, 'wb') as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(b'\x02' * MiB)
    with open_spec(raw_spec(path), tmp_path) as fmt:
        extents = list(fmt.extents())
        assert fmt.read(0, 16 * MiB) == bytes(5 * MiB) + b'\x02' * MiB + bytes(10 * MiB)
    # The file system reports data in its own blocks: at least the written
    # MiB, far less than the whole file.
    covered = sum(e.length for e in extents)
    assert all(e.kind is ExtentKind.DATA for e in extents)
    assert any(e.offset <= 5 * MiB and e.end >= 6 * MiB for e in extents), extents
    assert MiB <= covered <= 2 * MiB, extents


def test_empty_image_has_no_extents(tmp_path: Path) -> None:
    (tmp_path / 'empty.img').write_bytes(b'')
    with open_spec(raw_spec(tmp_path / 'empty.img'), tmp_path) as fmt:
        assert list(fmt.extents()) == []
        assert fmt.read(0, 4) == bytes(4)


def test_snapshots_oldest_first(tmp_path: Path) -> None:
    old = write(tmp_path / 'monday.img', 5000, 3)
    mid = write(tmp_path / 'tuesday.img', 7000, 4)
    head = write(tmp_path / 'head.img', 8000, 5)
    spec = raw_spec(tmp_path / 'head.img',
                    [tmp_path / 'monday.img', tmp_path / 'tuesday.img'])
    with open_spec(spec, tmp_path) as fmt:
        snaps = fmt.snapshots()
        assert snaps == [Snapshot('monday', 5000, '0'),
                         Snapshot('tuesday', 7000, '1')]
        assert fmt.read(0, 5000, snaps[0]) == old
        assert fmt.read(0, 7000, snaps[1]) == mid
        assert fmt.read(0, 8000) == head
        assert fmt.read(4990, 20, snaps[0]) == old[-10:] + bytes(10)
        assert fmt.size(snaps[1]) == 7000
        assert list(fmt.extents(snaps[0])) == [Extent(0, 5000)]


def test_unknown_snapshot(tmp_path: Path) -> None:
    write(tmp_path / 'head.img', 100, 6)
    with open_spec(raw_spec(tmp_path / 'head.img'), tmp_path) as fmt:
        with pytest.raises(InvalidArgument) as exc:
            fmt.read(0, 1, Snapshot('ghost', 100, '0'))
        assert "'ghost'" in str(exc.value)


@pytest.mark.parametrize('snaps,words', [
    ([{'type': 'qcow', 'name': 'a'}], "snapshots[0].type: 'qcow'"),
    ([{'type': 'raw', 'name': ''}], 'snapshots[0].name'),
    ([{'type': 'raw', 'name': 'a'}, {'type': 'raw', 'name': 'a'}],
     "snapshots[1].name: 'a' is used twice"),
])
def test_bad_snapshot_specs(tmp_path: Path, snaps: List[Dict[str, Any]],
                            words: str) -> None:
    write(tmp_path / 'head.img', 100, 7)
    for snap in snaps:
        snap['stream'] = stream(tmp_path / 'head.img')
    spec = raw_spec(tmp_path / 'head.img')
    spec['snapshots'] = snaps
    with pytest.raises(InvalidArgument) as exc:
        open_spec(spec, tmp_path)
    assert words in str(exc.value)


def test_failed_open_closes_what_was_opened(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    write(tmp_path / 'head.img', 100, 8)
    closed: List[str] = []
    from rbd_migration.streams.file import FileStream
    real_close = FileStream.close

    def spy(self: FileStream) -> None:
        closed.append(self.path)
        real_close(self)
    monkeypatch.setattr(FileStream, 'close', spy)
    spec = raw_spec(tmp_path / 'head.img')
    spec['snapshots'] = [{'type': 'raw', 'name': 'gone',
                          'stream': stream(tmp_path / 'gone.img')}]
    with pytest.raises(NotFound):
        open_spec(spec, tmp_path)
    assert closed == [str(tmp_path / 'head.img')]


def test_close_closes_every_stream(tmp_path: Path) -> None:
    write(tmp_path / 'a.img', 10, 9)
    write(tmp_path / 'head.img', 10, 10)
    fmt = open_spec(raw_spec(tmp_path / 'head.img', [tmp_path / 'a.img']),
                    tmp_path)
    snap = fmt.snapshots()[0]
    fmt.close()
    with pytest.raises(ValueError):
        fmt.read(0, 1)
    with pytest.raises(ValueError):
        fmt.read(0, 1, snap)
