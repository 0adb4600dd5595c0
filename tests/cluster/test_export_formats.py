"""The export (``rbd export --export-format 2``) and export-diff formats read
real rbd output exactly as ``rbd export img@snap`` shows each snapshot and
HEAD: bytes, sizes, extents and exact diffs, over an image with writes,
discards, a shrink and a regrowth between its snapshots.  Chains are checked
(one line naming diffs[i] and the snapshot expected), known formats given the
wrong type are named, and truncated or corrupt files are reported with the
stream and byte offset.  Crafted files cover what rbd does not write but
``rbd import-diff`` would accept: overlapping records, unknown v2 records,
several size changes; a randomized test compares chains with a byte-exact
model of ``rbd import-diff``."""
import json
import random
import shutil
import struct
import subprocess
import uuid
from pathlib import Path
from typing import (Any, Dict, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import pytest
import rados
import rbd

from qa.cluster import Cluster
from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument, SourceChanged
from rbd_migration.formats import open_format
from rbd_migration.formats.base import Extent, ExtentKind, Format, Snapshot
from rbd_migration.formats.export_diff import ExportDiffFormat
from rbd_migration.formats.export_v2 import ExportV2Format
from rbd_migration.source_spec import validate_source_spec
from rbd_migration.streams.file import FileStream

MiB = 1 << 20
KiB = 1 << 10


# -- helpers ------------------------------------------------------------------

def _rbd(cluster: Cluster, *args: str) -> bytes:
    assert cluster.state
    r = subprocess.run(['rbd', '--conf', cluster.state.conf, *args],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f'rbd {" ".join(args)}: {r.stderr.decode().strip()}')
    return r.stdout


def _file(path: Path) -> Dict[str, Any]:
    return {'type': 'file', 'file_path': str(path)}


def _open(spec: Dict[str, Any], root: Path) -> Format:
    """Through the schema and the registry, as an import would."""
    return open_format(validate_source_spec(spec),
                       SourceContext(allowed_file_roots=[str(root)]))


def _error(spec: Dict[str, Any], root: Path) -> str:
    with pytest.raises(InvalidArgument) as caught:
        _open(spec, root).close()
    message = str(caught.value)
    assert '\n' not in message and message.startswith('source-spec: ')
    return message


def _read_all(fmt: Format, snap: Optional[Snapshot], piece: int = 3 * MiB + 4097) -> bytes:
    """In odd-sized pieces, so that reads start and end inside records."""
    size = fmt.size(snap)
    return b''.join(fmt.read(off, min(piece, size - off), snap)
                    for off in range(0, size, piece))


def _check_sorted(extents: Sequence[Extent], size: int) -> None:
    pos = 0
    for e in extents:
        assert e.length > 0 and e.offset >= pos and e.end <= size, (e, pos, size)
        pos = e.end


def _check_extents(fmt: Format, snap: Optional[Snapshot], image: bytes) -> None:
    """Every non-zero byte lies in a DATA extent; ZERO extents read zeros."""
    extents = list(fmt.extents(snap))
    _check_sorted(extents, len(image))
    covered = bytearray(len(image))
    for e in extents:
        if e.kind is ExtentKind.ZERO:
            assert image[e.offset:e.end] == bytes(e.length)
        else:
            covered[e.offset:e.end] = b'\1' * e.length
    for pos in _nonzero_positions(image):
        assert covered[pos], f'non-zero byte at {pos} outside every DATA extent'


def _nonzero_positions(image: bytes, block: int = 4096) -> Iterator[int]:
    zero = bytes(block)
    for off in range(0, len(image), block):
        chunk = image[off:off + block]
        if chunk != zero[:len(chunk)]:
            yield off + next(i for i, b in enumerate(chunk) if b)


def _check_changed(fmt: Format, prev: Optional[Snapshot], snap: Optional[Snapshot],
                   before: bytes, after: bytes) -> List[Extent]:
    """What the copier relies on: starting from ``before`` resized to the new
    size, writing the DATA extents (read at ``snap``) and zeroing the ZERO
    ones gives ``after`` exactly."""
    changed = list(fmt.changed_extents(prev, snap))
    _check_sorted(changed, len(after))
    target = bytearray(before[:len(after)].ljust(len(after), b'\0'))
    for e in changed:
        if e.kind is ExtentKind.ZERO:
            assert after[e.offset:e.end] == bytes(e.length), e
            target[e.offset:e.end] = bytes(e.length)
        else:
            target[e.offset:e.end] = fmt.read(e.offset, e.length, snap)
    assert bytes(target) == after
    return changed


# -- the image and its exports --------------------------------------------------

def _pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.fixture(scope='module')
def exported(cluster: Cluster,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """An image with a history, its exports and its states as rbd shows them:

    s1: 24 MiB, data at 0, at 5 MiB + 123 (unaligned), 12-16 MiB; image-meta;
        s1 protected
    s2: 5 MiB rewritten in part, 12-16 MiB discarded (a whole object), 4 KiB
        + 200 KiB discarded inside the first object, data at 20 MiB
    s3: shrunk to 18 MiB (the data at 20 MiB is gone), data at 17 MiB
    HEAD: grown to 28 MiB, data at 26 MiB and at 1 MiB
    """
    assert cluster.state
    d = tmp_path_factory.mktemp('exports')
    name = f'ef-{uuid.uuid4().hex[:8]}'
    conn = rados.Rados(conffile=cluster.state.conf)
    conn.connect()
    ioctx = conn.open_ioctx('rbd')
    rbd.RBD().create(ioctx, name, 24 * MiB)
    try:
        with rbd.Image(ioctx, name) as img:
            img.write(_pattern(1, 1 * MiB), 0)
            img.write(_pattern(2, 300 * KiB), 5 * MiB + 123)
            img.write(_pattern(3, 4 * MiB), 12 * MiB)
            img.metadata_set('conf_rbd_cache', 'false')
            img.metadata_set('user.note', 'migrated \u2713')
            img.create_snap('s1')
            img.protect_snap('s1')
            img.write(_pattern(4, 100 * KiB), 5 * MiB + 50 * KiB)
            img.discard(12 * MiB, 4 * MiB)
            img.discard(4 * KiB, 200 * KiB)
            img.write(_pattern(5, 512 * KiB), 20 * MiB)
            img.create_snap('s2')
            img.resize(18 * MiB)
            img.write(_pattern(6, 64 * KiB), 17 * MiB)
            img.create_snap('s3')
            img.resize(28 * MiB)
            img.write(_pattern(7, 256 * KiB), 26 * MiB)
            img.write(_pattern(8, 8 * KiB), 1 * MiB)
            features = img.features()
        files = {
            'full': d / 'full.exp',
            'd1': d / 's1.diff', 'd2': d / 's1-s2.diff', 'd3': d / 's2-s3.diff',
            'dh': d / 's3-head.diff', 'raw1': d / 's1.raw',
        }
        _rbd(cluster, 'export', '--no-progress', '--export-format', '2', name,
             str(files['full']))
        _rbd(cluster, 'export-diff', '--no-progress', f'{name}@s1', str(files['d1']))
        _rbd(cluster, 'export-diff', '--no-progress', '--from-snap', 's1',
             f'{name}@s2', str(files['d2']))
        _rbd(cluster, 'export-diff', '--no-progress', '--from-snap', 's2',
             f'{name}@s3', str(files['d3']))
        _rbd(cluster, 'export-diff', '--no-progress', '--from-snap', 's3', name,
             str(files['dh']))
        _rbd(cluster, 'export', '--no-progress', f'{name}@s1', str(files['raw1']))
        states = {snap: _rbd(cluster, 'export', '--no-progress',
                             f'{name}@{snap}' if snap else name, '-')
                  for snap in ('s1', 's2', 's3', None)}
        yield {'dir': d, 'files': files, 'states': states, 'features': features,
               'name': name}
    finally:
        try:
            with rbd.Image(ioctx, name) as img:
                img.unprotect_snap('s1')
            _rbd(cluster, 'snap', 'purge', '--no-progress', name)
            _rbd(cluster, 'rm', '--no-progress', name)
        finally:
            ioctx.close()
            conn.shutdown()


def _by_name(fmt: Format) -> Dict[Optional[str], Optional[Snapshot]]:
    out: Dict[Optional[str], Optional[Snapshot]] = {s.name: s for s in fmt.snapshots()}
    out[None] = None
    return out


def _check_history(fmt: Format, states: Dict[Optional[str], bytes],
                   order: Sequence[Optional[str]]) -> None:
    """Bytes, sizes, extents, and exact diffs between every two states in
    order (consecutive ones and skips)."""
    snaps = _by_name(fmt)
    assert fmt.exact_diffs
    for name in order:
        assert fmt.size(snaps[name]) == len(states[name]), name
        assert _read_all(fmt, snaps[name]) == states[name], name
        _check_extents(fmt, snaps[name], states[name])
    _check_changed(fmt, None, snaps[order[0]], b'', states[order[0]])
    for i, prev in enumerate(order):
        for name in order[i + 1:]:
            _check_changed(fmt, snaps[prev], snaps[name], states[prev], states[name])


SIZES = {'s1': 24 * MiB, 's2': 24 * MiB, 's3': 18 * MiB, None: 28 * MiB}


def test_rbd_wrote_the_history_intended(exported: Dict[str, Any]) -> None:
    states = exported['states']
    assert {k: len(v) for k, v in states.items()} == SIZES
    assert states['s1'][12 * MiB:16 * MiB] == _pattern(3, 4 * MiB)
    assert states['s2'][12 * MiB:16 * MiB] == bytes(4 * MiB)
    assert states[None][18 * MiB:26 * MiB] == bytes(8 * MiB)


# -- export --export-format 2 -----------------------------------------------------

def test_export_v2_reads_every_snapshot_and_head(exported: Dict[str, Any]) -> None:
    with _open({'type': 'export', 'stream': _file(exported['files']['full'])},
               exported['dir']) as fmt:
        assert isinstance(fmt, ExportV2Format)
        assert [(s.name, s.size) for s in fmt.snapshots()] == \
            [('s1', SIZES['s1']), ('s2', SIZES['s2']), ('s3', SIZES['s3'])]
        assert fmt.size() == SIZES[None]
        _check_history(fmt, exported['states'], ['s1', 's2', 's3', None])


def test_export_v2_changes_are_the_records_between(exported: Dict[str, Any]) -> None:
    """Exact: s1 -> s2 names the rewrite, the discards and the new data and
    nothing of what stayed; the shrink to s3 loses the data at 20 MiB; HEAD
    zeroes nothing it did not have to."""
    with _open({'type': 'export', 'stream': _file(exported['files']['full'])},
               exported['dir']) as fmt:
        s = _by_name(fmt)
        changed = list(fmt.changed_extents(s['s1'], s['s2']))
        spans = [(e.offset, e.end) for e in changed]
        assert all(not (lo < 5 * MiB and hi > 1 * MiB) for lo, hi in spans), spans
        assert any(e.kind is ExtentKind.ZERO and e.offset <= 12 * MiB and
                   e.end >= 16 * MiB for e in changed), changed
        assert sum(e.length for e in changed) < 12 * MiB
        head = list(fmt.changed_extents(s['s3'], None))
        assert all(e.offset >= 1 * MiB for e in head)
        assert sum(e.length for e in head if e.kind is ExtentKind.DATA) <= 8 * MiB
        assert list(fmt.changed_extents(s['s2'], s['s2'])) == []


def test_export_v2_image_meta(cluster: Cluster, exported: Dict[str, Any]) -> None:
    with _open({'type': 'export', 'stream': _file(exported['files']['full'])},
               exported['dir']) as fmt:
        assert isinstance(fmt, ExportV2Format)
        meta = fmt.image_meta()
        assert meta == {'order': 22, 'features': exported['features'],
                        'stripe_unit': 4 * MiB, 'stripe_count': 1,
                        'metadata': {'conf_rbd_cache': 'false',
                                     'user.note': 'migrated \u2713'}}
        assert fmt.protected_snapshots() == ['s1']


def test_export_v2_of_a_snapshot_still_ends_at_head(cluster: Cluster,
                                                    exported: Dict[str, Any]) -> None:
    """rbd writes HEAD's diff from the image's HEAD even for img@snap."""
    path = exported['dir'] / 'at-s2.exp'
    _rbd(cluster, 'export', '--no-progress', '--export-format', '2',
         f"{exported['name']}@s2", str(path))
    with _open({'type': 'export', 'stream': _file(path)}, exported['dir']) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['s1', 's2', 's3']
        assert _read_all(fmt, None) == exported['states'][None]


# -- export-diff chains ---------------------------------------------------------

def _chain(files: Dict[str, Path], base: str, *diffs: Union[str, Tuple[str, str]],
           name: Optional[str] = None) -> Dict[str, Any]:
    spec: Dict[str, Any] = {'type': 'export-diff', 'stream': _file(files[base])}
    if name is not None:
        spec['name'] = name
    items = []
    for d in diffs:
        if isinstance(d, tuple):
            items.append({'stream': _file(files[d[0]]), 'name': d[1]})
        else:
            items.append({'stream': _file(files[d])})
    if items:
        spec['diffs'] = items
    return spec


def test_export_diff_chain_up_to_head(exported: Dict[str, Any]) -> None:
    spec = _chain(exported['files'], 'd1', 'd2', 'd3', 'dh')
    with _open(spec, exported['dir']) as fmt:
        assert isinstance(fmt, ExportDiffFormat)
        assert [(s.name, s.size) for s in fmt.snapshots()] == \
            [('s1', SIZES['s1']), ('s2', SIZES['s2']), ('s3', SIZES['s3'])]
        _check_history(fmt, exported['states'], ['s1', 's2', 's3', None])


def test_export_diff_reads_what_export_v2_reads(exported: Dict[str, Any]) -> None:
    """Same image, two kinds of file: the same extents at every state."""
    files, root = exported['files'], exported['dir']
    with _open(_chain(files, 'd1', 'd2', 'd3', 'dh'), root) as chain, \
            _open({'type': 'export', 'stream': _file(files['full'])}, root) as full:
        for a, b in zip(chain.snapshots() + [None], full.snapshots() + [None]):
            assert list(chain.extents(a)) == list(full.extents(b))


def test_export_diff_on_a_raw_base_ending_at_a_snapshot(exported: Dict[str, Any]) -> None:
    """``rbd export img@s1`` (raw) under two diffs: the raw base takes its
    name from the first diff's from-snap, and HEAD is s3's state."""
    spec = _chain(exported['files'], 'raw1', 'd2', 'd3')
    with _open(spec, exported['dir']) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['s1', 's2', 's3']
        states = dict(exported['states'])
        states[None] = states['s3']
        _check_history(fmt, states, ['s1', 's2', 's3', None])
        s3 = fmt.snapshots()[-1]
        assert list(fmt.changed_extents(s3, None)) == []
        # a raw image says nothing of allocation: all of it is data
        assert list(fmt.extents(fmt.snapshots()[0])) == [
            Extent(0, 24 * MiB, ExtentKind.DATA)]


def test_export_diff_names_from_the_spec(exported: Dict[str, Any]) -> None:
    """A diff's name replaces its to-snap (the chain is still checked with
    the names in the files); a raw base's name is what the first diff must
    start from, since nothing else tells which state the raw image holds."""
    spec = _chain(exported['files'], 'raw1', ('d2', 'second'), 'd3', ('dh', 'now'),
                  name='s1')
    with _open(spec, exported['dir']) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['s1', 'second', 's3', 'now']
        assert _read_all(fmt, None) == exported['states'][None]
        assert _read_all(fmt, fmt.snapshots()[-1]) == exported['states'][None]


def test_export_diff_base_alone(exported: Dict[str, Any]) -> None:
    files, root, states = exported['files'], exported['dir'], exported['states']
    with _open(_chain(files, 'd1'), root) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['s1']
        assert _read_all(fmt, None) == states['s1']
    with _open(_chain(files, 'raw1'), root) as fmt:
        assert fmt.snapshots() == []
        assert _read_all(fmt, None) == states['s1']


@pytest.mark.parametrize('base,diffs,message', [
    ('d1', ['d3'], "source-spec: diffs[0]: starts from snapshot 's2', expected "
                   "'s1' (where the base ends); list the diffs oldest first, each "
                   "starting where the one before ends"),
    ('d1', ['d2', 'dh'], "source-spec: diffs[1]: starts from snapshot 's3', "
                         "expected 's2' (where diffs[0] ends); list the diffs "
                         "oldest first, each starting where the one before ends"),
    ('d1', ['d3', 'd2'], "source-spec: diffs[0]: starts from snapshot 's2', "
                         "expected 's1' (where the base ends); list the diffs "
                         "oldest first, each starting where the one before ends"),
    ('d2', ['d3'], "source-spec: stream: the base diff starts from snapshot 's1'; "
                   "the base must be a raw image or a diff from nothing (`rbd "
                   "export-diff img@snap` without --from-snap)"),
    ('d1', ['d2', 'd1'], 'source-spec: diffs[1]: is a diff from nothing (no '
                         'from-snap), so it cannot follow diffs[0]; only the '
                         'base ("stream") may be one'),
    ('raw1', ['d2', 'd2'], "source-spec: diffs[1]: starts from snapshot 's1', "
                           "expected 's2' (where diffs[0] ends); list the diffs "
                           "oldest first, each starting where the one before ends"),
])
def test_broken_chains_name_the_diff(exported: Dict[str, Any], base: str,
                                     diffs: List[str], message: str) -> None:
    assert _error(_chain(exported['files'], base, *diffs), exported['dir']) == message


def test_a_raw_base_with_another_name_breaks_the_chain(exported: Dict[str, Any]) -> None:
    spec = _chain(exported['files'], 'raw1', 'd2', name='base')
    assert _error(spec, exported['dir']) == (
        "source-spec: diffs[0]: starts from snapshot 's1', expected 'base' (where "
        "the base ends); list the diffs oldest first, each starting where the one "
        "before ends")


def test_only_the_last_diff_may_end_at_head(tmp_path: Path) -> None:
    base = _write(tmp_path / 'base', diff_v1(to_snap=None, size=MiB))
    d = _write(tmp_path / 'd', diff_v1(from_snap='x', to_snap='y', size=MiB))
    spec = {'type': 'export-diff', 'stream': _file(base), 'diffs': [{'stream': _file(d)}]}
    assert _error(spec, tmp_path) == (
        'source-spec: stream: the base ends at HEAD (no to-snap, no "name"), which '
        'only the last diff may do; give it a "name", or list the diffs oldest first')
    spec['name'] = 'x'
    with _open(spec, tmp_path) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['x', 'y']


def test_duplicate_snapshot_names(exported: Dict[str, Any]) -> None:
    spec = _chain(exported['files'], 'd1', ('d2', 's1'))
    assert _error(spec, exported['dir']) == (
        "source-spec: diffs[0]: snapshot 's1' (its \"name\") is already the name "
        "of the base; give it another \"name\"")


# -- the wrong type -------------------------------------------------------------

def test_wrong_type_names_the_right_one(exported: Dict[str, Any]) -> None:
    files, root = exported['files'], exported['dir']
    qcow = root / 'disk.qcow2'
    if not qcow.exists():
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', str(qcow), '1M'],
                       check=True)
    assert _error({'type': 'export', 'stream': _file(files['d1'])}, root) == (
        f"source-spec: type: 'export', but file {files['d1']} does not start with "
        "b'rbd image v2\\n'; it is an `rbd export-diff` file: use \"type\": "
        '"export-diff"')
    assert _error({'type': 'export', 'stream': _file(files['raw1'])}, root).endswith(
        '`rbd export` without --export-format 2 writes a raw image: use "type": '
        '"raw"')
    assert _error({'type': 'export', 'stream': _file(qcow)}, root).endswith(
        'it holds a qcow image: use "type": "qcow"')
    assert _error(_chain(files, 'full'), root) == (
        f"source-spec: type: 'export-diff', but file {files['full']} (stream) is "
        "neither a raw image nor an `rbd export-diff` file; it holds an `rbd export "
        '--export-format 2` image: use "type": "export"')
    assert _error(_chain(files, 'd1', 'raw1'), root) == (
        f"source-spec: type: 'export-diff', but file {files['raw1']} "
        "(diffs[0].stream) is not an `rbd export-diff` file (no 'rbd diff' "
        'banner); it looks like a raw image: use "type": "raw"')
    files = dict(files, qcow=qcow)
    assert _error(_chain(files, 'qcow'), root).endswith(
        'it holds a qcow image: use "type": "qcow"')


# -- truncated and corrupt files -------------------------------------------------

def _records(data: bytes, start: int, version: int) -> List[Tuple[int, int]]:
    """(tag, offset) of each record of the diff at ``start``."""
    pos = start + 12
    out = []
    while True:
        tag = data[pos]
        out.append((tag, pos))
        if tag == ord('e'):
            return out
        if version == 2 and tag == ord('p'):
            pos += 10  # Pacific's length field says 8 here; the payload is 1
        elif version == 2:
            pos += 9 + struct.unpack_from('<Q', data, pos + 1)[0]
        elif tag in b'ft':
            pos += 5 + struct.unpack_from('<I', data, pos + 1)[0]
        elif tag == ord('s'):
            pos += 9
        elif tag == ord('w'):
            pos += 17 + struct.unpack_from('<Q', data, pos + 9)[0]
        else:
            pos += 17


def test_truncated_export_names_stream_and_offset(exported: Dict[str, Any]) -> None:
    src = exported['files']['full']
    data = src.read_bytes()
    first = data.index(b'rbd diff v2\n')
    writes = [at for tag, at in _records(data, first, 2) if tag == ord('w')]
    at = writes[1]
    cut = exported['dir'] / 'cut.exp'
    cut.write_bytes(data[:at + 17 + 1000])
    assert _error({'type': 'export', 'stream': _file(cut)}, exported['dir']) == (
        f"source-spec: stream: file {cut}: at byte {at}: the data of the 'w' record "
        f'is cut short (the file ends at byte {at + 17 + 1000}); the file is corrupt '
        'or incomplete, export it again')
    cut.write_bytes(data[:first - 3])
    assert _error({'type': 'export', 'stream': _file(cut)}, exported['dir']) == (
        f'source-spec: stream: file {cut}: at byte {first - 8}: the number of diffs '
        f'is cut short (the file ends at byte {first - 3}); the file is corrupt or '
        'incomplete, export it again')


def test_corrupt_diff_names_stream_and_offset(exported: Dict[str, Any]) -> None:
    files, root = exported['files'], exported['dir']
    data = bytearray(files['d2'].read_bytes())
    at = next(a for tag, a in _records(bytes(data), 0, 1) if tag == ord('w'))
    data[at] = ord('q')
    bad = root / 'bad.diff'
    bad.write_bytes(bytes(data))
    spec = _chain(dict(files, bad=bad), 'd1', 'bad')
    assert _error(spec, root) == (
        f"source-spec: diffs[0].stream: file {bad}: at byte {at}: unknown record "
        "tag 'q' in a version 1 diff; the file is corrupt or incomplete, export it "
        'again')
    # a write past the image size
    data = bytearray(files['d2'].read_bytes())
    struct.pack_into('<Q', data, at + 1, 24 * MiB)
    bad.write_bytes(bytes(data))
    message = _error(spec, root)
    assert message.startswith(f"source-spec: diffs[0].stream: file {bad}: at byte "
                              f"{at}: the 'w' record covers bytes {24 * MiB} to ")
    assert 'past the image size 25165824' in message


def test_file_shrinking_after_open_is_reported(exported: Dict[str, Any]) -> None:
    path = exported['dir'] / 'shrinks.exp'
    shutil.copy(exported['files']['full'], path)
    with _open({'type': 'export', 'stream': _file(path)}, exported['dir']) as fmt:
        with open(path, 'r+b') as f:
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(SourceChanged, match=r'the file shrank from \d+ to \d+ bytes'):
            _read_all(fmt, None)


# -- crafted files: what rbd accepts but does not write -----------------------------

Record = Tuple[str, int, Union[int, bytes]]  # ('w', offset, data) / ('z', offset, length)


def _v1_name(tag: str, name: str) -> bytes:
    raw = name.encode()
    return tag.encode() + struct.pack('<I', len(raw)) + raw


def diff_v1(records: Sequence[Record] = (), from_snap: Optional[str] = None,
            to_snap: Optional[str] = 'snap', size: Optional[int] = None) -> bytes:
    out = b'rbd diff v1\n'
    if from_snap is not None:
        out += _v1_name('f', from_snap)
    if to_snap is not None:
        out += _v1_name('t', to_snap)
    if size is not None:
        out += b's' + struct.pack('<Q', size)
    for tag, off, what in records:
        if tag == 'w':
            assert isinstance(what, bytes)
            out += b'w' + struct.pack('<QQ', off, len(what)) + what
        else:
            assert isinstance(what, int)
            out += b'z' + struct.pack('<QQ', off, what)
    return out + b'e'


def diff_v2(records: Sequence[Record] = (), from_snap: Optional[str] = None,
            to_snap: Optional[str] = 'snap', size: Optional[int] = None,
            protected: Optional[bool] = None, extra: bytes = b'') -> bytes:
    def rec(tag: bytes, payload: bytes) -> bytes:
        return tag + struct.pack('<Q', len(payload)) + payload
    out = b'rbd diff v2\n'
    for key, name in ((b'f', from_snap), (b't', to_snap)):
        if name is not None:
            raw = name.encode()
            out += rec(key, struct.pack('<I', len(raw)) + raw)
    if protected is not None:
        out += rec(b'p', bytes([protected]))
    if size is not None:
        out += rec(b's', struct.pack('<Q', size))
    out += extra
    for tag, off, what in records:
        if tag == 'w':
            assert isinstance(what, bytes)
            out += rec(b'w', struct.pack('<QQ', off, len(what)) + what)
        else:
            assert isinstance(what, int)
            out += rec(b'z', struct.pack('<QQ', off, what))
    return out + b'e'


def export_v2(diffs: Sequence[bytes], header: bytes = b'') -> bytes:
    def rec(tag: bytes, value: int) -> bytes:
        return tag + struct.pack('<QQ', 8, value)
    out = b'rbd image v2\n' + rec(b'O', 22) + rec(b'T', 1) + header + b'E'
    return out + b'rbd image diffs v2\n' + struct.pack('<Q', len(diffs)) + b''.join(diffs)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_overlapping_records_later_wins(tmp_path: Path) -> None:
    a, b, c = (bytes([x]) * 1000 for x in (1, 2, 3))
    d = diff_v1([('w', 0, a), ('w', 500, b), ('z', 200, 100), ('w', 100, c[:50])],
                to_snap='s', size=2000)
    path = _write(tmp_path / 'o.diff', d)
    with _open({'type': 'export-diff', 'stream': _file(path)}, tmp_path) as fmt:
        want = bytearray(2000)
        want[0:1000] = a
        want[500:1500] = b
        want[200:300] = bytes(100)
        want[100:150] = c[:50]
        assert fmt.read(0, 2000) == bytes(want)
        assert fmt.read(1990, 20) == bytes(want[1990:]) + bytes(10)
        assert list(fmt.extents()) == [Extent(0, 200, ExtentKind.DATA),
                                       Extent(200, 100, ExtentKind.ZERO),
                                       Extent(300, 1200, ExtentKind.DATA)]


def test_v2_unknown_records_are_skipped_known_ones_checked(tmp_path: Path) -> None:
    data = b'\x07' * 10
    good = diff_v2([('w', 0, data)], to_snap='s', size=4096, protected=True,
                   extra=b'X' + struct.pack('<Q', 3) + b'abc')
    path = _write(tmp_path / 'x.exp', export_v2(
        [good, diff_v2(from_snap='s', to_snap=None, size=4096)],
        header=b'M' + struct.pack('<QI', 8 + 1 + 2, 1) + b'k' + struct.pack('<I', 2)
        + b'\xff\xfe' + b'Q' + struct.pack('<Q', 2) + b'zz'))
    with _open({'type': 'export', 'stream': _file(path)}, tmp_path) as fmt:
        assert isinstance(fmt, ExportV2Format)
        assert fmt.read(0, 12) == data + bytes(2)
        assert fmt.protected_snapshots() == ['s']
        value = fmt.image_meta()['metadata']['k']
        assert value.encode('utf-8', 'surrogateescape') == b'\xff\xfe'
    # Pacific writes 8 as the length of the one-byte 'p' record; rbd
    # import-diff reads known records by their layout, and so do we
    pacific = good.replace(b'p' + struct.pack('<Q', 1), b'p' + struct.pack('<Q', 8))
    assert pacific != good
    path = _write(tmp_path / 'pacific.exp', export_v2(
        [pacific, diff_v2(from_snap='s', to_snap=None)]))
    with _open({'type': 'export', 'stream': _file(path)}, tmp_path) as fmt:
        assert isinstance(fmt, ExportV2Format)
        assert fmt.read(0, 10) == data and fmt.protected_snapshots() == ['s']


def test_unknown_v1_record_and_oversized_names_are_corrupt(tmp_path: Path) -> None:
    path = _write(tmp_path / 'a.diff', b'rbd diff v1\nt' + struct.pack('<I', 5000))
    assert _error({'type': 'export-diff', 'stream': _file(path)}, tmp_path) == (
        f"source-spec: stream: file {path}: at byte 12: the 't' record claims 5000 "
        'bytes (at most 4096); the file is corrupt or incomplete, export it again')
    path = _write(tmp_path / 'b.diff', diff_v1(to_snap='\u00e9', size=1)
                  .replace('\u00e9'.encode(), b'\xe9\x00'))
    assert 'the snapshot name is not UTF-8' in _error(
        {'type': 'export-diff', 'stream': _file(path)}, tmp_path)


@pytest.mark.parametrize('diffs,problem', [
    ([diff_v2(to_snap='a', size=10), diff_v2(from_snap='b', to_snap=None)],
     "diff 1 of 2 starts from 'b', expected 'a'"),
    ([diff_v2(to_snap=None, size=10), diff_v2(to_snap=None)],
     'diff 0 of 2 ends at HEAD, which only the last may do'),
    ([diff_v2(from_snap='x', to_snap='a', size=10)],
     "diff 0 of 1 starts from 'x', expected nothing"),
    ([diff_v2(to_snap='a', size=10), diff_v2(from_snap='a', to_snap='a')],
     "snapshot 'a' appears twice"),
    ([diff_v2(to_snap='a')], 'the first diff has no size record'),
    ([diff_v1(to_snap='a', size=10)], 'a version 1 diff inside an export'),
    ([diff_v2([('w', 8, b'abc')], to_snap='a', size=10)],
     "the 'w' record covers bytes 8 to 11, past the image size 10"),
])
def test_export_v2_structure_is_checked(tmp_path: Path, diffs: List[bytes],
                                        problem: str) -> None:
    path = _write(tmp_path / 'x.exp', export_v2(diffs))
    assert problem in _error({'type': 'export', 'stream': _file(path)}, tmp_path)


def test_impossible_diff_count(tmp_path: Path) -> None:
    data = export_v2([diff_v2(to_snap=None, size=10)])
    count_at = data.index(b'rbd image diffs v2\n') + 19
    data = data[:count_at] + struct.pack('<Q', 2**40) + data[count_at + 8:]
    path = _write(tmp_path / 'x.exp', data)
    assert _error({'type': 'export', 'stream': _file(path)}, tmp_path) == (
        f'source-spec: stream: file {path}: at byte {count_at}: the number of '
        f'diffs, {2**40}, is impossible in a file of {len(data)} bytes; the file '
        'is corrupt or incomplete, export it again')


def test_metadata_after_data_is_corrupt(tmp_path: Path) -> None:
    d = diff_v1([('w', 0, b'x')], to_snap='a', size=10)[:-1] + b's' + struct.pack('<Q', 5) + b'e'
    path = _write(tmp_path / 'a.diff', d)
    assert "the 's' record follows data records" in _error(
        {'type': 'export-diff', 'stream': _file(path)}, tmp_path)


def test_reads_are_composed_through_shrinks_and_growths(tmp_path: Path) -> None:
    """Shrinking drops what lay past the new end for good: growing again
    shows zeros there, and the changes name them."""
    files = [
        _write(tmp_path / '0', diff_v1([('w', 0, b'\x01' * 100)], to_snap='a', size=100)),
        _write(tmp_path / '1', diff_v1(from_snap='a', to_snap='b', size=40)),
        _write(tmp_path / '2', diff_v1([('w', 90, b'\x02' * 5)], from_snap='b',
                                       to_snap='c', size=120)),
    ]
    spec = {'type': 'export-diff', 'stream': _file(files[0]),
            'diffs': [{'stream': _file(f)} for f in files[1:]]}
    with _open(spec, tmp_path) as fmt:
        a, b, c = fmt.snapshots()
        want_c = b'\x01' * 40 + bytes(50) + b'\x02' * 5 + bytes(25)
        assert fmt.read(0, 120, c) == want_c
        assert fmt.read(0, 100, a) == b'\x01' * 100
        assert list(fmt.changed_extents(a, c)) == [
            Extent(40, 50, ExtentKind.ZERO), Extent(90, 5, ExtentKind.DATA),
            Extent(95, 5, ExtentKind.ZERO)]
        _check_changed(fmt, a, c, b'\x01' * 100, want_c)


class _Model:
    """``rbd import-diff`` applied to a byte array."""

    def __init__(self) -> None:
        self.image = bytearray()

    def apply(self, records: Sequence[Record], size: int) -> bytes:
        del self.image[size:]
        self.image.extend(bytes(size - len(self.image)))
        for tag, off, what in records:
            if tag == 'w':
                assert isinstance(what, bytes)
                self.image[off:off + len(what)] = what
            else:
                assert isinstance(what, int)
                self.image[off:off + what] = bytes(what)
        return bytes(self.image)


@pytest.mark.parametrize('seed', range(12))
def test_random_chains_match_import_diff(tmp_path: Path, seed: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    model = _Model()
    states: List[bytes] = []
    specs = []
    size = 0
    layers = rng.randint(1, 6)
    for i in range(layers):
        size = rng.choice([size, size, rng.randint(0, 64 * KiB)]) if i else \
            rng.randint(1, 64 * KiB)
        records: List[Record] = []
        for _ in range(rng.randint(0, 12)):
            if size == 0:
                break
            off = rng.randrange(size)
            length = rng.randint(1, min(size - off, 8 * KiB))
            if rng.random() < 0.7:
                records.append(('w', off, bytes([rng.randint(1, 255)]) * length))
            else:
                records.append(('z', off, length))
        last = i == layers - 1
        to_snap = None if last and rng.random() < 0.5 else f's{i}'
        make = diff_v2 if rng.random() < 0.5 else diff_v1
        data = make(records, from_snap=f's{i - 1}' if i else None,
                    to_snap=to_snap, size=size)
        specs.append({'stream': _file(_write(tmp_path / f'{i}.diff', data))})
        states.append(model.apply(records, size))
    spec = {'type': 'export-diff', 'stream': specs[0]['stream'], 'diffs': specs[1:]}
    with _open(spec, tmp_path) as fmt:
        snaps: List[Optional[Snapshot]] = list(fmt.snapshots())
        if len(snaps) < layers:
            snaps.append(None)
        assert len(snaps) == layers
        for snap, state in zip(snaps, states):
            assert fmt.read(0, len(state) + 7, snap) == state + bytes(7)
            _check_extents(fmt, snap, state)
        # Records read together, merged as over HTTP or S3 (any gap, any
        # limit), hold the same bytes.
        monkeypatch.setattr(FileStream, 'merge_gap', rng.choice([0, 100, 4096]))
        monkeypatch.setattr(FileStream, 'merge_limit', rng.choice([512, 64 * KiB]))
        for snap, state in zip(snaps, states):
            cuts = sorted(rng.randrange(len(state) + 8) for _ in range(rng.randint(0, 5)))
            bounds = [0, *cuts, len(state) + 7]
            views = [memoryview(bytearray(hi - lo)) for lo, hi in zip(bounds, bounds[1:])]
            fmt.read_pieces(list(zip(bounds, views)), snap)
            assert b''.join(views) == state + bytes(7)
        monkeypatch.undo()
        _check_changed(fmt, None, snaps[0], b'', states[0])
        for i in range(layers):
            for j in range(i + 1, layers):
                _check_changed(fmt, snaps[i], snaps[j], states[i], states[j])
            _check_changed(fmt, snaps[i], None, states[i], states[-1])


def test_spec_round_trip_through_json(exported: Dict[str, Any]) -> None:
    spec = _chain(exported['files'], 'd1', 'd2')
    with _open(json.loads(json.dumps(spec)), exported['dir']) as fmt:
        assert [s.name for s in fmt.snapshots()] == ['s1', 's2']
