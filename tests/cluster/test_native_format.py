"""The native format reads an RBD image of the cluster at a snapshot exactly
as the rbd CLI sees it: snapshots, sizes, allocated ranges (``rbd diff``) and
bytes (``rbd export``), for plain images, sparse images, clones, images in a
namespace and a live migration source in the trash."""
import json
import random
import subprocess
import threading
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import pytest
import rados
import rbd

from qa.cluster import Cluster
from rbd_migration.context import SourceContext
from rbd_migration.errors import NotFound
from rbd_migration.formats import open_format
from rbd_migration.formats.base import Extent, ExtentKind, Snapshot
from rbd_migration.formats.native import NativeFormat

MiB = 1 << 20


def _rbd(cluster: Cluster, *args: str) -> bytes:
    assert cluster.state
    r = subprocess.run(['rbd', '--conf', cluster.state.conf, *args],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f'rbd {" ".join(args)}: {r.stderr.decode().strip()}')
    return r.stdout


def _rbd_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(_rbd(cluster, *args, '--format', 'json'))


def _export(cluster: Cluster, image: str) -> bytes:
    return _rbd(cluster, 'export', '--no-progress', image, '-')


def _coalesce(extents: Iterable[Extent]) -> List[Extent]:
    out: List[Extent] = []
    for e in sorted(extents, key=lambda e: e.offset):
        if out and out[-1].kind == e.kind and out[-1].end == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.kind)
        else:
            out.append(e)
    return out


def _rbd_diff(cluster: Cluster, image: str,
              from_snap: Optional[str] = None) -> List[Extent]:
    """``rbd diff`` as extents: exists=true is DATA, false is ZERO."""
    args = ['diff', image] + (['--from-snap', from_snap] if from_snap else [])
    return _coalesce(
        Extent(d['offset'], d['length'],
               ExtentKind.DATA if d['exists'] in ('true', True)
               else ExtentKind.ZERO)
        for d in _rbd_json(cluster, *args))


def _snap_ids(cluster: Cluster, image: str) -> Dict[str, int]:
    return {s['name']: s['id']
            for s in _rbd_json(cluster, 'snap', 'ls', '--all', image)}


def _remove(cluster: Cluster, image: str, protected: str = '') -> None:
    """Best effort: a test that failed half-way leaves less behind."""
    steps = [['snap', 'unprotect', f'{image}@{protected}']] if protected else []
    steps += [['snap', 'purge', '--no-progress', image],
              ['rm', '--no-progress', image]]
    for args in steps:
        try:
            _rbd(cluster, *args)
        except RuntimeError:
            pass


def _name(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex[:8]}'


@pytest.fixture(scope='module')
def conn(cluster: Cluster) -> Iterator[rados.Rados]:
    assert cluster.state
    r = rados.Rados(conffile=cluster.state.conf)
    r.connect()
    yield r
    r.shutdown()


@pytest.fixture(scope='module')
def ctx(conn: rados.Rados) -> SourceContext:
    return SourceContext(rados=conn)


@pytest.fixture(scope='module')
def ioctx(conn: rados.Rados) -> Iterator[rados.Ioctx]:
    io = conn.open_ioctx('rbd')
    yield io
    io.close()


def _spec(image: str, snap: str, **more: Any) -> Dict[str, Any]:
    return {'type': 'native', 'pool_name': 'rbd', 'image_name': image,
            'snap_name': snap, **more}


def _open(ctx: SourceContext, spec: Dict[str, Any]) -> NativeFormat:
    fmt = open_format(spec, ctx)
    assert isinstance(fmt, NativeFormat)
    return fmt


@pytest.fixture(scope='module')
def history(cluster: Cluster, ioctx: rados.Ioctx) -> Iterator[str]:
    """16 MiB -> s1 -> s2 (zeroed object) -> grown to 24 MiB, s3 (discarded
    object) -> more writes at HEAD that no snapshot holds."""
    name = _name('nf-hist')
    rng = random.Random(1)

    def data(n: int) -> bytes:
        return rng.randbytes(n)

    rbd.RBD().create(ioctx, name, 16 * MiB, order=22)
    try:
        with rbd.Image(ioctx, name) as img:
            img.write(data(64 << 10), 0)
            img.write(data(MiB), 5 * MiB)
            img.write(data(4096), 8 * MiB + 12288)
            img.create_snap('s1')
            img.write(data(100 << 10), 9 * MiB + 17)
            img.write(data(4096), 4096)
            img.write_zeroes(4 * MiB, 4 * MiB)        # a whole object
            img.create_snap('s2')
            img.resize(24 * MiB)
            img.write(data(3 * MiB), 19 * MiB)
            img.discard(8 * MiB, 4 * MiB)             # a whole object
            img.write(data(512), 6 * MiB)
            img.create_snap('s3')
            img.write(data(2 * MiB), 0)
            img.write(data(MiB), 22 * MiB)
        yield name
    finally:
        _remove(cluster, f'rbd/{name}')


# -- snapshots, sizes, extents and bytes --------------------------------------

@pytest.mark.parametrize('at, older', [('s1', []), ('s2', ['s1']),
                                       ('s3', ['s1', 's2'])])
def test_snapshots_are_the_older_ones(cluster: Cluster, ctx: SourceContext,
                                      history: str, at: str,
                                      older: List[str]) -> None:
    ids = _snap_ids(cluster, f'rbd/{history}')
    sizes = {s['name']: s['size']
             for s in _rbd_json(cluster, 'snap', 'ls', f'rbd/{history}')}
    with _open(ctx, _spec(history, at)) as fmt:
        assert fmt.snapshots() == [Snapshot(n, sizes[n], ident=str(ids[n]))
                                   for n in older]
        assert fmt.snap_id == ids[at] and fmt.snap_name == at
        assert fmt.features.notes == []


@pytest.mark.parametrize('at', ['s1', 's2', 's3'])
def test_head_matches_rbd_export_and_diff(cluster: Cluster, ctx: SourceContext,
                                          history: str, at: str) -> None:
    image = f'rbd/{history}@{at}'
    with _open(ctx, _spec(history, at)) as fmt:
        assert fmt.size() == _rbd_json(cluster, 'info', image)['size']
        extents = list(fmt.extents())
        assert extents == [e for e in _rbd_diff(cluster, image)
                           if e.kind is ExtentKind.DATA]
        assert all(a.end < b.offset for a, b in zip(extents, extents[1:]))
        expected = _export(cluster, image)
        assert fmt.read(0, fmt.size()) == expected
        # gaps read as zeros, as the interface promises
        pos = 0
        for ext in extents + [Extent(fmt.size(), 0)]:
            assert expected[pos:ext.offset] == bytes(ext.offset - pos)
            pos = ext.end


def test_older_snapshots_read_through_one_format(
        cluster: Cluster, ctx: SourceContext, history: str) -> None:
    with _open(ctx, _spec(history, 's3')) as fmt:
        for snap in fmt.snapshots():
            image = f'rbd/{history}@{snap.name}'
            assert fmt.size(snap) == snap.size == 16 * MiB
            assert list(fmt.extents(snap)) == [
                e for e in _rbd_diff(cluster, image)
                if e.kind is ExtentKind.DATA]
            assert fmt.read(0, snap.size, snap) == _export(cluster, image)
        assert fmt.size() == 24 * MiB


def test_read_past_the_end_is_zeros(cluster: Cluster, ctx: SourceContext,
                                    history: str) -> None:
    with _open(ctx, _spec(history, 's1')) as fmt:
        s1 = _export(cluster, f'rbd/{history}@s1')
        assert fmt.read(16 * MiB - 10, 30) == s1[-10:] + bytes(20)
        assert fmt.read(16 * MiB + 5, 7) == bytes(7)
        assert fmt.read(5 * MiB, 0) == b''
        with pytest.raises(ValueError):
            fmt.read(-1, 10)


def test_head_is_the_snapshot_not_the_live_image(
        cluster: Cluster, ctx: SourceContext, history: str) -> None:
    with _open(ctx, _spec(history, 's3')) as fmt:
        assert fmt.read(0, 2 * MiB) != _export(cluster, f'rbd/{history}')[:2 * MiB]


# -- diffs between snapshots --------------------------------------------------

@pytest.mark.parametrize('start, end', [('s1', 's2'), ('s2', 's3'),
                                        ('s1', 's3'), (None, 's2')])
def test_diff_extents_match_rbd_diff_from_snap(
        cluster: Cluster, ctx: SourceContext, history: str,
        start: Optional[str], end: str) -> None:
    with _open(ctx, _spec(history, 's3')) as fmt:
        snaps = {s.name: s for s in fmt.snapshots()}
        from_snap = snaps[start] if start else None
        to_snap = snaps.get(end)      # s3 is HEAD
        got = list(fmt.diff_extents(from_snap, to_snap))
    want = _rbd_diff(cluster, f'rbd/{history}@{end}', start)
    assert got == want
    if start == 's1' and end == 's2':
        # the zeroed object's old data shows as ZERO, new writes as DATA
        assert any(e.kind is ExtentKind.ZERO and e.offset <= 5 * MiB
                   and e.end >= 6 * MiB for e in got), got
        assert any(e.kind is ExtentKind.DATA for e in got)


def test_diff_extents_refuses_a_reversed_pair(ctx: SourceContext,
                                              history: str) -> None:
    with _open(ctx, _spec(history, 's3')) as fmt:
        s1, s2 = fmt.snapshots()
        with pytest.raises(ValueError):
            list(fmt.diff_extents(s2, s1))
        with pytest.raises(ValueError):
            fmt.diff_extents(Snapshot('s3', 0, 'x'))


# -- sparse images, clones, namespaces, ids ----------------------------------

def test_sparse_image_reports_only_what_was_written(
        cluster: Cluster, ctx: SourceContext, ioctx: rados.Ioctx) -> None:
    name = _name('nf-sparse')
    rbd.RBD().create(ioctx, name, 64 * MiB, order=22)
    try:
        written = [(4096, 4096), (13 * MiB, 8192), (63 * MiB + 12288, 4096)]
        with rbd.Image(ioctx, name) as img:
            for offset, length in written:
                img.write(b'\xab' * length, offset)
            img.create_snap('snap')
        with _open(ctx, _spec(name, 'snap')) as fmt:
            extents = list(fmt.extents())
            assert extents == _rbd_diff(cluster, f'rbd/{name}@snap')
            # The OSD reports allocation within an object (memstore from the
            # object's start): each extent lies in a written object, and
            # every written range is covered.
            objects = {o // (4 * MiB) for o, _ in written}
            assert len(extents) == 3
            for ext in extents:
                assert ext.kind is ExtentKind.DATA
                assert ext.offset // (4 * MiB) in objects
                assert (ext.end - 1) // (4 * MiB) == ext.offset // (4 * MiB)
            for offset, length in written:
                assert any(e.offset <= offset and offset + length <= e.end
                           for e in extents)
            assert fmt.read(0, 64 * MiB) == _export(cluster, f'rbd/{name}@snap')
    finally:
        _remove(cluster, f'rbd/{name}')


def test_clone_reads_include_the_parent(cluster: Cluster, ctx: SourceContext,
                                        ioctx: rados.Ioctx) -> None:
    parent, child = _name('nf-parent'), _name('nf-child')
    rbd.RBD().create(ioctx, parent, 16 * MiB, order=22)
    try:
        with rbd.Image(ioctx, parent) as img:
            img.write(b'P' * MiB, 0)
            img.write(b'Q' * MiB, 10 * MiB)
            img.create_snap('base')
            img.protect_snap('base')
        rbd.RBD().clone(ioctx, parent, 'base', ioctx, child)
        with rbd.Image(ioctx, child) as img:
            img.write(b'C' * 4096, 8192)
            img.write(b'D' * MiB, 6 * MiB)
            img.create_snap('cs')
        try:
            with _open(ctx, _spec(child, 'cs')) as fmt:
                assert fmt.snapshots() == []
                assert any(f'clone of rbd/{parent}@base' in n
                           for n in fmt.features.notes)
                exported = _export(cluster, f'rbd/{child}@cs')
                data = fmt.read(0, fmt.size())
                assert data == exported
                assert data[10 * MiB:11 * MiB] == b'Q' * MiB   # parent only
                assert data[8192:12288] == b'C' * 4096
                assert data[:8192] == b'P' * 8192
                extents = list(fmt.extents())
                assert extents == [e for e in _rbd_diff(cluster,
                                                        f'rbd/{child}@cs')
                                   if e.kind is ExtentKind.DATA]
                assert any(e.offset <= 10 * MiB < e.end for e in extents)
        finally:
            _remove(cluster, f'rbd/{child}')
    finally:
        _remove(cluster, f'rbd/{parent}', protected='base')


def test_image_in_a_namespace(cluster: Cluster, ctx: SourceContext) -> None:
    ns, name = _name('ns'), _name('nf-ns')
    _rbd(cluster, 'namespace', 'create', f'rbd/{ns}')
    try:
        _rbd(cluster, 'create', '--size', '8M', f'rbd/{ns}/{name}')
        _rbd(cluster, 'bench', '--io-type', 'write', '--io-total', '1M',
             '--io-pattern', 'rand', f'rbd/{ns}/{name}')
        _rbd(cluster, 'snap', 'create', '--no-progress', f'rbd/{ns}/{name}@a')
        with _open(ctx, _spec(name, 'a', pool_namespace=ns)) as fmt:
            assert fmt.read(0, 8 * MiB) == _export(cluster,
                                                   f'rbd/{ns}/{name}@a')
        with pytest.raises(NotFound, match='^source-spec: image_name: '):
            _open(ctx, _spec(name, 'a'))
    finally:
        _remove(cluster, f'rbd/{ns}/{name}')
        _rbd(cluster, 'namespace', 'remove', f'rbd/{ns}')


def test_ids_as_numbers_and_strings(cluster: Cluster, ctx: SourceContext,
                                    conn: rados.Rados, history: str) -> None:
    ids = _snap_ids(cluster, f'rbd/{history}')
    image_id = _rbd_json(cluster, 'info', f'rbd/{history}')['id']
    pool_id = conn.pool_lookup('rbd')
    expected = _export(cluster, f'rbd/{history}@s2')
    for pool in (pool_id, str(pool_id)):
        for snap in (ids['s2'], str(ids['s2'])):
            spec = {'type': 'native', 'pool_id': pool, 'image_name': history,
                    'image_id': image_id, 'snap_id': snap}
            with _open(ctx, spec) as fmt:
                assert fmt.snap_name == 's2'
                assert [s.name for s in fmt.snapshots()] == ['s1']
                assert fmt.read(0, fmt.size()) == expected


def test_migration_source_in_the_trash_opens_by_id(
        cluster: Cluster, ctx: SourceContext) -> None:
    src, dst = _name('nf-msrc'), _name('nf-mdst')
    _rbd(cluster, 'create', '--size', '8M', f'rbd/{src}')
    _rbd(cluster, 'bench', '--io-type', 'write', '--io-total', '2M',
         f'rbd/{src}')
    _rbd(cluster, 'snap', 'create', '--no-progress', f'rbd/{src}@m1')
    expected = _export(cluster, f'rbd/{src}@m1')
    image_id = _rbd_json(cluster, 'info', f'rbd/{src}')['id']
    _rbd(cluster, 'migration', 'prepare', f'rbd/{src}', f'rbd/{dst}')
    try:
        trash = _rbd_json(cluster, 'trash', 'ls', '--all', 'rbd')
        assert {'id': image_id, 'name': src} in trash
        with pytest.raises(NotFound, match='^source-spec: image_name: .*'
                                           'image_id'):
            _open(ctx, _spec(src, 'm1'))
        with _open(ctx, _spec(src, 'm1', image_id=image_id)) as fmt:
            assert fmt.read(0, fmt.size()) == expected
    finally:
        _rbd(cluster, 'migration', 'abort', '--no-progress', f'rbd/{dst}')
        _remove(cluster, f'rbd/{src}')


def test_only_user_snapshots_are_imported(cluster: Cluster, ctx: SourceContext,
                                          ioctx: rados.Ioctx) -> None:
    """A snapshot removed while a clone needs it moves to the trash
    namespace: it is not imported, and snap_name cannot name it."""
    name, child = _name('nf-trashsnap'), _name('nf-tchild')
    rbd.RBD().create(ioctx, name, 8 * MiB, order=22)
    try:
        with rbd.Image(ioctx, name) as img:
            img.write(b'a' * 4096, 0)
            img.create_snap('a')
            img.write(b'b' * 4096, 0)
            img.create_snap('b')
        _rbd(cluster, 'clone', '--rbd-default-clone-format', '2',
             f'rbd/{name}@b', f'rbd/{child}')
        try:
            _rbd(cluster, 'snap', 'rm', '--no-progress', f'rbd/{name}@b')
            with rbd.Image(ioctx, name) as img:
                img.write(b'c' * 4096, 0)
                img.create_snap('c')
            snaps = _rbd_json(cluster, 'snap', 'ls', '--all', f'rbd/{name}')
            trashed = next(s for s in snaps
                           if s['namespace']['type'] == 'trash')
            with _open(ctx, _spec(name, 'c')) as fmt:
                assert [s.name for s in fmt.snapshots()] == ['a']
                assert any('trash' in n for n in fmt.features.notes)
            with pytest.raises(NotFound, match='^source-spec: snap_name: '):
                _open(ctx, _spec(name, trashed['name']))
            spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': name,
                    'snap_id': trashed['id']}
            with _open(ctx, spec) as fmt:
                assert fmt.read(0, 4096) == b'b' * 4096
                assert [s.name for s in fmt.snapshots()] == ['a']
        finally:
            _remove(cluster, f'rbd/{child}')
    finally:
        _remove(cluster, f'rbd/{name}')


# -- errors -------------------------------------------------------------------

def _error(ctx: SourceContext, spec: Dict[str, Any]) -> str:
    with pytest.raises(NotFound) as info:
        _open(ctx, spec)
    text = str(info.value)
    assert '\n' not in text
    return text


def test_errors_name_the_field(ctx: SourceContext, history: str) -> None:
    missing = _name('missing')
    cases: List[Tuple[Dict[str, Any], str]] = [
        (_spec(history, 's1', pool_name=missing), 'pool_name'),
        ({'type': 'native', 'pool_id': 987654, 'image_name': history,
          'snap_name': 's1'}, 'pool_id'),
        (_spec(history, 's1', pool_namespace=missing), 'pool_namespace'),
        (_spec(missing, 's1'), 'image_name'),
        (_spec(history, 's1', image_id='0123deadbeef'), 'image_id'),
        (_spec(history, missing), 'snap_name'),
        ({'type': 'native', 'pool_name': 'rbd', 'image_name': history,
          'snap_id': '987654'}, 'snap_id'),
    ]
    for spec, field in cases:
        text = _error(ctx, spec)
        assert text.startswith(f'source-spec: {field}: '), text
        assert '`' in text, text        # a command that shows what exists
    assert missing in _error(ctx, _spec(history, missing))


# -- concurrency and lifetime -------------------------------------------------

def test_concurrent_reads(cluster: Cluster, ctx: SourceContext,
                          history: str) -> None:
    with _open(ctx, _spec(history, 's3')) as fmt:
        targets: List[Optional[Snapshot]] = [None, *fmt.snapshots()]
        expected: Dict[Optional[str], bytes] = {
            None: _export(cluster, f'rbd/{history}@s3')}
        for snap in fmt.snapshots():
            expected[snap.name] = _export(cluster, f'rbd/{history}@{snap.name}')
        errors: List[BaseException] = []
        start = threading.Barrier(8)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                start.wait()       # the first reads race to open handles
                for _ in range(60):
                    snap = rng.choice(targets)
                    want = expected[snap.name if snap else None]
                    offset = rng.randrange(0, len(want))
                    length = rng.randrange(1, 2 * MiB)
                    got = fmt.read(offset, length, snap)
                    tail = want[offset:offset + length]
                    assert got == tail + bytes(length - len(tail))
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]


def test_close_is_idempotent(ctx: SourceContext, history: str) -> None:
    fmt = _open(ctx, _spec(history, 's3'))
    s1 = fmt.snapshots()[0]
    fmt.read(0, 10, s1)
    fmt.close()
    fmt.close()
    for snap in (None, s1, fmt.snapshots()[1]):   # open, HEAD, never opened
        with pytest.raises(ValueError, match='closed'):
            fmt.read(0, 10, snap)


def test_extents_stream_across_diff_windows(
        cluster: Cluster, ctx: SourceContext, history: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows that cut objects (and extents) in the middle change nothing:
    the pieces are joined again."""
    from rbd_migration.formats import native
    with _open(ctx, _spec(history, 's3')) as fmt:
        s1, s2 = fmt.snapshots()
        whole = (list(fmt.extents()), list(fmt.extents(s1)),
                 list(fmt.diff_extents(s1, s2)))
        monkeypatch.setattr(native, 'DIFF_WINDOW', 3 * MiB + 4096)
        assert (list(fmt.extents()), list(fmt.extents(s1)),
                list(fmt.diff_extents(s1, s2))) == whole


def test_overlapping_reports_prefer_data() -> None:
    from rbd_migration.formats.native import _extents
    got = _extents([(10, 20), (15, 30), (40, 50)], [(0, 12), (25, 45), (60, 70)])
    assert got == [Extent(0, 10, ExtentKind.ZERO), Extent(10, 20),
                   Extent(30, 10, ExtentKind.ZERO), Extent(40, 10),
                   Extent(60, 10, ExtentKind.ZERO)]
