"""FileStream: reads, the confinement to the allowed directories, and that
the file checked is the file read (and the probe's routing that relies on
it)."""
import concurrent.futures
import errno
import os
import random
import threading
import time
from pathlib import Path
from typing import List

import pytest

from rbd_migration.context import SourceContext
from rbd_migration.errors import (Cancelled, InvalidArgument, NotFound,
                                  PermissionDenied, SourceChanged, TimedOut,
                                  Unsupported)
from rbd_migration.probe import ADAPTER, probe
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


# -- the file opened is the file read -----------------------------------------


def test_symlink_swapped_after_open_keeps_the_original(root: Path, image: Path,
                                                       tmp_path: Path) -> None:
    """What was checked is what is read: a name pointed elsewhere after the
    open (at the mgr's keyring, say) is never followed again."""
    secret = tmp_path / 'keyring'
    secret.write_bytes(b'S' * 100_000)
    link = root / 'link.img'
    link.symlink_to(image)
    data = image.read_bytes()
    with open_file(str(link), [root]) as stream:
        swapped = root / 'swap.tmp'
        swapped.symlink_to(secret)
        os.replace(swapped, link)                  # atomic, like an attacker
        assert stream.read(0, len(data)) == data
        view = memoryview(bytearray(4096))
        assert stream.read_into(50_000, view) == 4096
        assert bytes(view) == data[50_000:54_096]
    with pytest.raises(PermissionDenied):          # a new open is checked anew
        open_file(str(link), [root])


def test_file_replaced_after_open_keeps_the_original(root: Path,
                                                     image: Path) -> None:
    data = image.read_bytes()
    with open_file(str(image), [root]) as stream:
        other = root / 'other.img'
        other.write_bytes(b'\0' * len(data))
        os.replace(other, image)
        assert stream.read(0, len(data)) == data


def test_refusal_names_the_field_and_the_fix(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / 'outside.img'
    outside.write_bytes(b'x')
    (root / 'link.img').symlink_to(outside)
    with pytest.raises(PermissionDenied) as exc:
        open_file(str(root / 'link.img'), [root])
    message = str(exc.value)
    assert message.startswith('source-spec: stream.file_path: ')
    assert ROOTS_OPTION in message and str(outside) in message
    assert '\n' not in message


def test_sibling_symlink_escaping_the_roots_is_refused(root: Path, image: Path,
                                                       tmp_path: Path) -> None:
    (tmp_path / 'secret').write_bytes(b'x')
    (root / 'base.img').symlink_to(tmp_path / 'secret')
    with open_file(str(image), [root]) as stream:
        with pytest.raises(PermissionDenied) as exc:
            stream.sibling('base.img')
    assert "source-spec: stream.file_path: 'base.img'" in str(exc.value)
    assert ROOTS_OPTION in str(exc.value)


def test_sibling_symlink_within_the_roots_is_allowed(root: Path,
                                                     image: Path) -> None:
    (root / 'store').mkdir()
    (root / 'store' / 'base.img').write_bytes(b'base')
    (root / 'base.img').symlink_to(root / 'store' / 'base.img')
    with open_file(str(image), [root]) as stream, stream.sibling('base.img') as sib:
        assert sib.read(0, 4) == b'base'


def test_fifo_open_does_not_block(root: Path) -> None:
    """Opening a fifo for reading waits for a writer: the open must not."""
    fifo = root / 'pipe'
    os.mkfifo(fifo)
    outcome: List[Exception] = []

    def attempt() -> None:
        try:
            open_file(str(fifo), [root])
        except Exception as e:  # handed to the test's thread
            outcome.append(e)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():               # unblock it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail('opening a fifo blocked')
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgument), outcome
    assert 'fifo' in str(outcome[0])


# -- validators and a source that changes -------------------------------------


def test_validators_pin_what_was_opened(root: Path, image: Path) -> None:
    st = image.stat()
    with open_file(str(image), [root]) as stream:
        assert stream.validators() == {'size': str(st.st_size),
                                       'mtime_ns': str(st.st_mtime_ns),
                                       'ino': str(st.st_ino)}


def test_validators_change_after_a_write(root: Path, image: Path) -> None:
    with open_file(str(image), [root]) as stream:
        before = stream.validators()
        with open(image, 'ab') as f:
            f.write(b'more')
        os.utime(image, ns=(0, int(before['mtime_ns']) + 1_000_000_000))
        after = stream.validators()
        assert int(after['size']) == int(before['size']) + 4
        assert after['mtime_ns'] != before['mtime_ns']
        assert after['ino'] == before['ino']
        # the stream still reads the image as it was sized at open
        assert stream.size() == int(before['size'])
        assert stream.read(int(before['size']) - 2, 10) == image.read_bytes()[-6:-4]


def test_validators_tell_a_file_swapped_in(root: Path, image: Path) -> None:
    with open_file(str(image), [root]) as stream:
        before = stream.validators()
    replacement = root / 'new.img'
    replacement.write_bytes(image.read_bytes())
    os.replace(replacement, image)
    with open_file(str(image), [root]) as stream:
        assert stream.validators()['ino'] != before['ino']


def test_file_truncated_mid_read_is_source_changed(root: Path, image: Path) -> None:
    data = image.read_bytes()
    with open_file(str(image), [root]) as stream:
        assert stream.read(0, 4096) == data[:4096]
        os.truncate(image, 30_000)
        assert stream.read(0, 4096) == data[:4096]           # still there
        with pytest.raises(SourceChanged) as exc:
            stream.read(20_000, 20_000)                      # runs past the cut
        with pytest.raises(SourceChanged):
            stream.read_into(40_000, memoryview(bytearray(100)))
        with pytest.raises(SourceChanged):
            list(stream.allocated(0, len(data)))
    message = str(exc.value)
    assert message.startswith(f"source-spec: stream.file_path: '{image}'")
    assert f'from {len(data)} to 30000 bytes' in message
    assert 'do not change the image while it is imported' in message
    assert '\n' not in message and exc.value.errno == errno.ESTALE


def test_sparse_file_end_is_not_a_change(root: Path) -> None:
    """A hole up to the end is the file's own, not a shrink."""
    sparse = root / 'sparse.img'
    with open(sparse, 'wb') as f:
        f.write(b'data')
        f.truncate(1 << 20)
    with open_file(str(sparse), [root]) as stream:
        extents = list(stream.allocated(0, 1 << 20))
        assert extents and extents[0][0] == 0
        assert sum(n for _, n in extents) <= 1 << 20
        assert stream.read((1 << 20) - 4, 8) == b'\0' * 4


def test_reads_stop_on_cancel(root: Path, image: Path) -> None:
    stop = threading.Event()
    ctx = SourceContext(allowed_file_roots=[str(root)], stop=stop)
    with FileStream.from_spec(spec(str(image)), ctx) as stream:
        assert stream.read(0, 10)
        stop.set()
        with pytest.raises(Cancelled):
            stream.read(0, 10)
        with pytest.raises(Cancelled):
            stream.read_into(0, memoryview(bytearray(10)))
        with pytest.raises(Cancelled):
            list(stream.allocated(0, 10))


def test_reads_stop_at_the_deadline(root: Path, image: Path) -> None:
    ctx = SourceContext(allowed_file_roots=[str(root)], deadline=time.monotonic() - 1)
    with FileStream.from_spec(spec(str(image)), ctx) as stream:
        with pytest.raises(TimedOut):
            stream.read(0, 10)


# -- the probe sends file sources to the module's reader ----------------------


def test_probe_routes_file_sources_to_the_adapter(root: Path, image: Path) -> None:
    ctx = SourceContext(allowed_file_roots=[str(root)])
    report = probe({'type': 'raw', 'stream': spec(str(image))}, ctx)
    assert report.path == ADAPTER
    assert any(f"librbd would open '{image}' again by name" in r
               for r in report.reasons), report.reasons


def test_probe_refuses_librbd_for_a_file_source(root: Path, image: Path) -> None:
    ctx = SourceContext(allowed_file_roots=[str(root)])
    with pytest.raises(Unsupported) as exc:
        probe({'type': 'raw', 'stream': spec(str(image)),
               'rbd_migration': {'engine': 'librbd'}}, ctx)
    message = str(exc.value)
    assert 'again by name at execute' in message
    assert 'drop "engine": "librbd"' in message and '\n' not in message


def test_probe_names_file_snapshots_too(root: Path, image: Path) -> None:
    older = root / 'older.img'
    older.write_bytes(image.read_bytes())
    ctx = SourceContext(allowed_file_roots=[str(root)])
    report = probe({'type': 'raw', 'stream': spec(str(image)),
                    'snapshots': [{'type': 'raw', 'name': 'first',
                                   'stream': spec(str(older))}]}, ctx)
    assert report.path == ADAPTER
    assert any(f"'{older}'" in r for r in report.reasons), report.reasons
