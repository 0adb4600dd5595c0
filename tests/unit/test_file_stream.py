"""FileStream: reads, and the confinement to the allowed directories."""
import concurrent.futures
import errno
import os
import random
from pathlib import Path
from typing import List

import pytest

from rbd_migration.context import SourceContext
from rbd_migration.errors import (InvalidArgument, NotFound,
                                  PermissionDenied)
from rbd_migration.streams import open_stream
from rbd_migration.streams.file import ROOTS_OPTION, FileStream


def spec(path: object) -> dict:
    return {'type': 'file', 'file_path': path}


def open_file(path: object, roots: List[Path]) -> FileStream:
    ctx = SourceContext(allowed_file_roots=[str(r) for r in roots])
    return FileStream.from_spec(spec(path), ctx)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / 'images'
    root.mkdir()
    return root


@pytest.fixture
def image(root: Path) -> Path:
    path = root / 'disk.img'
    path.write_bytes(random.Random(1).randbytes(100_000))
    return path


# -- reading ------------------------------------------------------------------


def test_size_and_reads(image: Path, root: Path) -> None:
    data = image.read_bytes()
    with open_file(str(image), [root]) as stream:
        assert stream.size() == len(data)
        assert stream.read(0, 10) == data[:10]
        assert stream.read(54321, 4000) == data[54321:58321]
        assert stream.read(len(data) - 5, 100) == data[-5:]   # short at EOF
        assert stream.read(len(data) + 5, 100) == b''
        assert stream.read(7, 0) == b''
        assert str(image) in stream.description


def test_registry_opens_file(image: Path, root: Path) -> None:
    ctx = SourceContext(allowed_file_roots=[str(root)])
    with open_stream(spec(str(image)), ctx) as stream:
        assert isinstance(stream, FileStream)


def test_concurrent_reads(image: Path, root: Path) -> None:
    data = image.read_bytes()
    rng = random.Random(2)
    reads = [(rng.randrange(len(data)), rng.randrange(1, 9000))
             for _ in range(2000)]
    with open_file(str(image), [root]) as stream:
        def check(arg: tuple) -> bool:
            offset, length = arg
            return stream.read(offset, length) == data[offset:offset + length]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(check, reads))


def test_negative_read_is_a_bug(image: Path, root: Path) -> None:
    with open_file(str(image), [root]) as stream, pytest.raises(ValueError):
        stream.read(-1, 10)


def test_closed_stream(image: Path, root: Path) -> None:
    stream = open_file(str(image), [root])
    stream.close()
    stream.close()                      # idempotent
    with pytest.raises(ValueError):
        stream.read(0, 1)


# -- confinement --------------------------------------------------------------


def test_no_roots_refuses_and_names_the_option(image: Path) -> None:
    with pytest.raises(PermissionDenied) as exc:
        open_file(str(image), [])
    message = str(exc.value)
    assert message.startswith(f"source-spec: stream.file_path: '{image}'")
    assert ROOTS_OPTION == 'mgr/rbd_migration/file_source_roots'
    assert f'ceph config set mgr {ROOTS_OPTION}' in message
    assert exc.value.errno == errno.EPERM
    assert '\n' not in message


def test_dotdot_escape_is_refused(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / 'secret.img'
    secret.write_bytes(b'x')
    sneaky = f'{root}/../secret.img'
    with pytest.raises(PermissionDenied) as exc:
        open_file(sneaky, [root])
    assert 'not under an allowed directory' in str(exc.value)
    assert ROOTS_OPTION in str(exc.value)
    assert str(secret) in str(exc.value)           # what it resolved to


def test_symlink_out_of_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / 'outside.img'
    outside.write_bytes(b'x')
    (root / 'link.img').symlink_to(outside)
    with pytest.raises(PermissionDenied):
        open_file(str(root / 'link.img'), [root])


def test_symlinked_directory_out_of_root_is_refused(root: Path,
                                                    tmp_path: Path) -> None:
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'disk.img').write_bytes(b'x')
    (root / 'dir').symlink_to(elsewhere)
    with pytest.raises(PermissionDenied):
        open_file(str(root / 'dir' / 'disk.img'), [root])


def test_symlink_within_root_is_allowed(root: Path, image: Path) -> None:
    (root / 'alias.img').symlink_to(image)
    with open_file(str(root / 'alias.img'), [root]) as stream:
        assert stream.read(0, 4) == image.read_bytes()[:4]


def test_root_given_through_a_symlink(root: Path, image: Path,
                                      tmp_path: Path) -> None:
    (tmp_path / 'root-link').symlink_to(root)
    with open_file(str(image), [tmp_path / 'root-link']) as stream:
        assert stream.size() == image.stat().st_size


def test_sibling_directory_with_common_prefix_is_refused(
        root: Path, tmp_path: Path) -> None:
    other = tmp_path / 'images2'
    other.mkdir()
    (other / 'disk.img').write_bytes(b'x')
    with pytest.raises(PermissionDenied):
        open_file(str(other / 'disk.img'), [root])


def test_any_of_several_roots(image: Path, root: Path, tmp_path: Path) -> None:
    with open_file(str(image), [tmp_path / 'nothing-here', root]) as stream:
        assert stream.size() > 0


# -- file types and existence -------------------------------------------------


def test_dev_null_is_refused() -> None:
    with pytest.raises(InvalidArgument) as exc:
        open_file('/dev/null', [Path('/dev')])
    assert 'character device' in str(exc.value)
    assert 'stream.file_path' in str(exc.value)


def test_directory_is_refused(root: Path) -> None:
    (root / 'sub').mkdir()
    with pytest.raises(InvalidArgument) as exc:
        open_file(str(root / 'sub'), [root])
    assert 'a directory' in str(exc.value)


def test_fifo_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / 'pipe')
    with pytest.raises(InvalidArgument) as exc:
        open_file(str(root / 'pipe'), [root])
    assert 'fifo' in str(exc.value)


def test_missing_file(root: Path) -> None:
    with pytest.raises(NotFound) as exc:
        open_file(str(root / 'nope.img'), [root])
    assert "stream.file_path: '" in str(exc.value)
    assert 'does not exist' in str(exc.value)


def test_dangling_symlink_is_missing(root: Path) -> None:
    (root / 'dangling.img').symlink_to(root / 'gone.img')
    with pytest.raises(NotFound):
        open_file(str(root / 'dangling.img'), [root])


@pytest.mark.parametrize('path', ['disk.img', '', None, 42])
def test_path_must_be_absolute(path: object, root: Path) -> None:
    with pytest.raises(InvalidArgument) as exc:
        open_file(path, [root])
    assert 'absolute path' in str(exc.value)


# -- siblings (backing and data files) ----------------------------------------


def test_sibling_relative_and_absolute(root: Path, image: Path) -> None:
    (root / 'sub').mkdir()
    base = root / 'sub' / 'base.img'
    base.write_bytes(b'base')
    with open_file(str(image), [root]) as stream:
        with stream.sibling('sub/base.img') as sib:
            assert sib.read(0, 4) == b'base'
        with stream.sibling(str(base)) as sib:
            assert sib.read(0, 4) == b'base'


def test_sibling_resolves_against_the_given_path(root: Path, image: Path,
                                                 tmp_path: Path) -> None:
    """Like QEMU: a backing name is relative to the image as named, even
    when that name is a symlink into another directory."""
    (root / 'links').mkdir()
    (root / 'links' / 'disk.img').symlink_to(image)
    (root / 'links' / 'base.img').write_bytes(b'next to the link')
    with open_file(str(root / 'links' / 'disk.img'), [root]) as stream:
        with stream.sibling('base.img') as sib:
            assert sib.read(0, 4) == b'next'


def test_sibling_outside_root_is_refused(root: Path, image: Path,
                                         tmp_path: Path) -> None:
    (tmp_path / 'base.img').write_bytes(b'x')
    with open_file(str(image), [root]) as stream:
        with pytest.raises(PermissionDenied) as exc:
            stream.sibling('../base.img')
        assert "'../base.img'" in str(exc.value)
        assert str(image) in str(exc.value)
        with pytest.raises(PermissionDenied):
            stream.sibling(str(tmp_path / 'base.img'))
        with pytest.raises(PermissionDenied):
            stream.sibling('/dev/null')
