"""What changed between a qcow2's internal snapshots, against QEMU.

Images are made with qemu-img/qemu-io: data, a snapshot, writes, zeroes and
discards, another snapshot, more writes.  ``changed_extents`` must name
exactly the clusters those touched, and applying each layer's changes to
the layer before must give what ``qemu-img convert`` reads of it.
"""
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from rbd_migration.engine.copier import Checkpoint, Copier, CopyOptions
from rbd_migration.formats.base import Extent, ExtentKind, Format, Snapshot
from rbd_migration.formats.qcow import QcowFormat
from tests.profile import examples
from tests.unit.test_copier import MemoryTarget
from tests.unit.test_qcow import convert, open_qcow, qemu_io, reference, run

KiB, MiB = 1 << 10, 1 << 20
DATA, ZERO = ExtentKind.DATA, ExtentKind.ZERO


# -- checking -----------------------------------------------------------------


def changes(fmt: Format, prev: Optional[Snapshot], snap: Optional[Snapshot]) -> List[Extent]:
    """``changed_extents``, checked to be ascending, disjoint, merged and
    inside ``snap``'s size."""
    exts = list(fmt.changed_extents(prev, snap))
    pos, last = 0, None
    for ext in exts:
        assert ext.length > 0 and ext.offset >= pos and ext.end <= fmt.size(snap), exts
        assert last is None or last.end < ext.offset or last.kind != ext.kind, exts
        pos, last = ext.end, ext
    return exts


def apply(fmt: Format, prev: Optional[Snapshot], snap: Optional[Snapshot],
          before: bytes) -> bytes:
    """``before`` (the disk at ``prev``) resized to ``snap``'s size as librbd
    resizes (cut, or grown with zeros), with ``snap``'s changes written."""
    size = fmt.size(snap)
    out = bytearray(before[:size])
    out += bytes(size - len(out))
    for ext in changes(fmt, prev, snap):
        if ext.kind is DATA:
            out[ext.offset:ext.end] = fmt.read(ext.offset, ext.length, snap)
        else:
            out[ext.offset:ext.end] = bytes(ext.length)
    return bytes(out)


def layer_bytes(fmt: Format, img: Path) -> List[bytes]:
    """What QEMU reads of every layer, snapshots first, at the layer's size."""
    return [reference(img, snap.name if snap else None)[:fmt.size(snap)]
            for snap in [*fmt.snapshots(), None]]


def check_replay(fmt: Format, img: Path) -> List[bytes]:
    """Each layer's changes, applied in order from an empty disk, give each
    layer; and so do the changes from any snapshot to any layer (both
    states are in the file now, so order does not matter)."""
    layers: List[Optional[Snapshot]] = [*fmt.snapshots(), None]
    want = layer_bytes(fmt, img)
    have = b''
    prev: Optional[Snapshot] = None
    for snap, expected in zip(layers, want):
        have = apply(fmt, prev, snap, have)
        assert have == expected, f'{prev} -> {snap}'
        prev = snap
    for i, a in enumerate(fmt.snapshots()):   # ``prev=None`` is an empty disk
        for j, b in enumerate(layers):
            assert apply(fmt, a, b, want[i]) == want[j], f'{a} -> {b}'
    return want


def clusters(exts: Sequence[Extent], cluster: int,
             kind: Optional[ExtentKind] = None) -> Set[int]:
    return {c for e in exts if kind in (None, e.kind)
            for c in range(e.offset // cluster, -(-e.end // cluster))}


def span(offset: int, length: int, cluster: int) -> Set[int]:
    return set(range(offset // cluster, -(-(offset + length) // cluster)))


# -- a scripted history -------------------------------------------------------


@dataclass
class Step:
    """qemu-io commands on clusters, then a snapshot (or HEAD: ``None``)."""

    snapshot: Optional[str]
    writes: List[Tuple[int, int]] = field(default_factory=list)
    zeroes: List[Tuple[int, int]] = field(default_factory=list)
    discards: List[Tuple[int, int]] = field(default_factory=list)

    def commands(self, fill: int) -> List[str]:
        return ([f'write -P {fill} {o} {n}' for o, n in self.writes]
                + [f'write -z {o} {n}' for o, n in self.zeroes]
                + [f'discard {o} {n}' for o, n in self.discards])

    def touched(self, ops: str, cluster: int) -> Set[int]:
        return set().union(*(span(o, n, cluster) for o, n in getattr(self, ops)))


#: After data everywhere (or a compressed image's data) and s1: a cluster
#: written whole, one in part, a run across clusters; zeroes and discards
#: of clusters that held data; then s2; then HEAD's writes.
HISTORY = [
    Step('s2', writes=[(64 * KiB, 64 * KiB), (200 * KiB, 2 * KiB), (1 * MiB, 200 * KiB)],
         zeroes=[(2 * MiB, 128 * KiB)], discards=[(3 * MiB, 64 * KiB)]),
    Step(None, writes=[(0, 4 * KiB), (2 * MiB + 64 * KiB, 64 * KiB), (3 * MiB + 512 * KiB, 64 * KiB)]),
]


def play(img: Path, steps: Sequence[Step]) -> None:
    for fill, step in enumerate(steps, 0x41):
        commands = step.commands(fill)
        if commands:
            qemu_io(img, *commands)
        if step.snapshot:
            run('qemu-img', 'snapshot', '-c', step.snapshot, str(img))


def scripted(tmp_path: Path, opts: str, compress: bool = False) -> Path:
    """4 MiB of data (compressed: random bytes and text) then s1, then
    ``HISTORY``."""
    rng = random.Random(5)
    raw = tmp_path / 'disk.raw'
    text = bytes(b'ACGT'[i % 4] for i in range(256))
    raw.write_bytes(b''.join(rng.randbytes(64 * KiB).translate(text) if i % 2
                             else rng.randbytes(64 * KiB) for i in range(64)))
    img = convert(raw, tmp_path / 'disk.qcow2', opts, compress=compress)
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    play(img, HISTORY)
    return img


VARIANTS = {
    'v3-64k': 'cluster_size=64k',
    'v3-4k': 'cluster_size=4k',
    'v2-64k': 'compat=0.10,cluster_size=64k',
    'extended-l2': 'cluster_size=64k,extended_l2=on',
}


def check_history(fmt: QcowFormat, img: Path, zeros_are_zero: bool) -> None:
    """The clusters each layer names are the ones ``HISTORY`` touched; what
    was written is DATA, and, where QEMU keeps zeros as such, what was
    zeroed or discarded is ZERO."""
    cs = fmt.header.cluster_size
    s1, s2 = fmt.snapshots()
    for prev, snap, step in ((s1, s2, HISTORY[0]), (s2, None, HISTORY[1])):
        exts = changes(fmt, prev, snap)
        wiped = step.touched('zeroes', cs) | step.touched('discards', cs)
        assert clusters(exts, cs) == step.touched('writes', cs) | wiped
        assert clusters(exts, cs, DATA) >= step.touched('writes', cs)
        if zeros_are_zero:
            assert clusters(exts, cs, ZERO) == wiped
    check_replay(fmt, img)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_changes_are_the_clusters_written(tmp_path: Path, variant: str) -> None:
    img = scripted(tmp_path, VARIANTS[variant])
    with open_qcow(img) as fmt:
        assert fmt.exact_diffs
        # v2 has no zero flag: QEMU writes zeroes as data.
        check_history(fmt, img, zeros_are_zero=not variant.startswith('v2'))


@pytest.mark.parametrize('compression', ['zlib', 'zstd'])
def test_compressed_image_changes(tmp_path: Path, compression: str) -> None:
    img = scripted(tmp_path, f'cluster_size=64k,compression_type={compression}',
                   compress=True)
    with open_qcow(img) as fmt:
        assert fmt.features.compressed
        check_history(fmt, img, zeros_are_zero=True)
        # s1 is HISTORY's start: everything, as compressed clusters read.
        assert changes(fmt, None, fmt.snapshots()[0]) == [Extent(0, 4 * MiB)]


def test_a_table_both_states_share_is_not_read(tmp_path: Path) -> None:
    """16 MiB in 4 KiB clusters: eight L2 tables, of which a write after the
    snapshot copies one; the others are skipped by their L1 entry."""
    img = tmp_path / 'disk.qcow2'
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', str(img), '16M')
    qemu_io(img, 'write -P 0x11 0 16M')
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    qemu_io(img, 'write -P 0x12 9M 4k')
    with open_qcow(img) as fmt:
        loaded: List[int] = []
        load = fmt._map._l2_table

        def counted(offset: int) -> object:
            loaded.append(offset)
            return load(offset)
        fmt._map._l2_table = counted  # type: ignore[method-assign,assignment]
        assert changes(fmt, fmt.snapshots()[0], None) == [Extent(9 * MiB, 4 * KiB)]
        assert len(set(loaded)) == 2, loaded    # the slot's old and new table
        check_replay(fmt, img)


def test_backing_file_shows_where_a_state_maps_nothing(tmp_path: Path) -> None:
    """An overlay's s0 maps nothing, s1 its writes; s2 zeroes and discards
    some (ZERO: the backing must not show); HEAD goes back to s0 and writes
    elsewhere, so what s2 mapped reads from the backing again: its DATA,
    and ZERO where the backing has none."""
    base = tmp_path / 'base.qcow2'
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', str(base), '4M')
    qemu_io(base, 'write -P 0x01 0 3M')           # the last MiB is not allocated
    img = tmp_path / 'overlay.qcow2'
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base.name, '-F', 'qcow2',
        '-o', 'cluster_size=64k', str(img), '4M', cwd=tmp_path)
    run('qemu-img', 'snapshot', '-c', 's0', str(img))
    qemu_io(img, 'write -P 0x02 0 256k', 'write -P 0x03 3M 128k')
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    qemu_io(img, 'discard 0 64k', 'write -z 64k 64k')
    run('qemu-img', 'snapshot', '-c', 's2', str(img))
    run('qemu-img', 'snapshot', '-a', 's0', str(img))
    qemu_io(img, 'write -P 0x04 1M 64k')
    with open_qcow(img, backing=open_qcow(base)) as fmt:
        s0, s1, s2 = fmt.snapshots()
        assert changes(fmt, s0, s1) == [Extent(0, 256 * KiB), Extent(3 * MiB, 128 * KiB)]
        assert changes(fmt, s1, s2) == [Extent(0, 128 * KiB, ZERO)]
        assert changes(fmt, s2, None) == [
            Extent(0, 256 * KiB), Extent(1 * MiB, 64 * KiB),
            Extent(3 * MiB, 128 * KiB, ZERO)]
        assert changes(fmt, s0, None) == [Extent(1 * MiB, 64 * KiB)]
        check_replay(fmt, img)


def test_a_grown_image_reports_what_lies_past_the_old_end(tmp_path: Path) -> None:
    """s1 ends inside a cluster; bytes stored past its end in that cluster
    (QEMU never shows them at s1) read at the larger HEAD, whose entry for
    the cluster is the same: they are changed all the same."""
    img = tmp_path / 'disk.qcow2'
    size = 2 * MiB + 1536
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', str(img), str(size))
    qemu_io(img, f'write -P 0x21 {size - 64 * KiB} {64 * KiB}')
    with open_qcow(img) as fmt:
        (host,) = {r.host for r in fmt._runs(fmt._l1, 2 * MiB, 2 * MiB + 512)}
    with open(img, 'r+b') as f:      # the last cluster's tail, past the end
        f.seek(host + size - 2 * MiB)
        f.write(b'\x5a' * 1000)
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    # ``qemu-img resize`` would zero the tail (copying the cluster): the
    # header's size grows alone, as another writer might have grown it.
    with open(img, 'r+b') as f:
        f.seek(24)
        f.write((3 * MiB).to_bytes(8, 'big'))
    qemu_io(img, f'write -P 0x22 {2 * MiB + 512 * KiB} 4k')
    with open_qcow(img) as fmt:
        (s1,) = fmt.snapshots()
        assert fmt.size(s1) == size and fmt.size() == 3 * MiB
        got = changes(fmt, s1, None)
        assert Extent(size, 2 * MiB + 64 * KiB - size) in got
        assert Extent(2 * MiB + 512 * KiB, 64 * KiB) in got
        assert clusters(got, 64 * KiB) == {32, 40}
        assert reference(img)[size:size + 1000] == b'\x5a' * 1000
        check_replay(fmt, img)


# -- random histories -----------------------------------------------------------


OPS = st.tuples(st.sampled_from(['write', 'zero', 'discard']),
                st.integers(0, 127), st.integers(1, 40))


@settings(max_examples=examples(quick=20, thorough=300), deadline=None, database=None)
@given(opts=st.sampled_from(['cluster_size=512', 'cluster_size=4k',
                             'cluster_size=4k,compat=0.10',
                             'cluster_size=64k,extended_l2=on']),
       steps=st.lists(st.lists(OPS, max_size=8), min_size=2, max_size=4),
       revert=st.booleans())
def test_random_histories_replay(tmp_path_factory: pytest.TempPathFactory, opts: str,
                                 steps: List[List[Tuple[str, int, int]]], revert: bool) -> None:
    """Writes, zeroes and discards in 2 KiB units over 256 KiB, a snapshot
    after each group (HEAD's last, maybe after going back to the first
    snapshot): the layers replay, and each names only clusters touched
    since the one before."""
    tmp = tmp_path_factory.mktemp('history')
    img = tmp / 'disk.qcow2'
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', opts, str(img), '256k')
    unit = 2 * KiB
    names = [f's{i}' for i in range(len(steps) - 1)] + [None]
    verbs = {'write': 'write -P {fill}', 'zero': 'write -z', 'discard': 'discard'}
    for i, (ops, name) in enumerate(zip(steps, names)):
        if name is None and revert and len(names) > 1:
            run('qemu-img', 'snapshot', '-a', 's0', str(img))
        commands = [verbs[op].format(fill=i + 1) + f' {at * unit} {min(n, 128 - at) * unit}'
                    for op, at, n in ops]
        if commands:
            qemu_io(img, *commands)
        if name:
            run('qemu-img', 'snapshot', '-c', name, str(img))
    with open_qcow(img) as fmt:
        cs = fmt.header.cluster_size
        check_replay(fmt, img)
        layers: List[Optional[Snapshot]] = [*fmt.snapshots(), None]
        for i in range(1, len(layers)):
            if layers[i] is None and revert:
                continue    # HEAD follows s0, not the snapshot before it
            touched = set().union(*(span(at * unit, min(n, 128 - at) * unit, cs)
                                    for _, at, n in steps[i]))
            assert clusters(changes(fmt, layers[i - 1], layers[i]), cs) <= touched


# -- the copier ---------------------------------------------------------------


class SnapshottingTarget(MemoryTarget):
    """An image in memory that keeps its bytes at each snapshot."""

    def __init__(self) -> None:
        super().__init__(0)
        self.snaps: Dict[str, bytes] = {}

    def create_snap(self, name: str) -> None:
        self.snaps[name] = bytes(self.data)


class GenericQcow(QcowFormat):
    """The qcow2 reader as it was: every layer wholly changed, checked
    against the target."""

    exact_diffs = False

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        return Format.changed_extents(self, prev, snap)


def copied(fmt: QcowFormat) -> Tuple[SnapshottingTarget, int]:
    target = SnapshottingTarget()
    copier = Copier(fmt, target, CopyOptions(checkpoint_interval=0.0),
                    lambda done, total: True, lambda c: None)
    return target, copier.run(Checkpoint()).bytes_read


def test_copier_reads_only_what_changed(tmp_path: Path) -> None:
    """A compressed 32 MiB qcow2 with two snapshots and a little written
    after each: the copy reads each snapshot's changes, not the whole disk
    again, and the target holds every layer as QEMU reads it."""
    rng = random.Random(9)
    raw = tmp_path / 'disk.raw'
    raw.write_bytes(rng.randbytes(24 * MiB) + bytes(8 * MiB))
    img = convert(raw, tmp_path / 'disk.qcow2', 'cluster_size=64k', compress=True)
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    qemu_io(img, 'write -P 0x31 1M 512k', 'write -z 10M 1M', 'discard 20M 1M')
    run('qemu-img', 'snapshot', '-c', 's2', str(img))
    qemu_io(img, 'write -P 0x32 5M 256k', 'write -P 0x33 28M 64k')
    spec = {'type': 'file', 'file_path': str(img)}
    with open_qcow(img) as fmt:
        want = layer_bytes(fmt, img)
        exact, exact_read = copied(fmt)
    with GenericQcow.from_spec({'type': 'qcow', 'stream': spec}, fmt._ctx) as generic:
        whole, whole_read = copied(generic)
    for target in (exact, whole):
        assert [target.snaps['s1'], target.snaps['s2'], bytes(target.data)] == want
    # Every layer's data again (s2 and HEAD lost 2 MiB to zeroes and
    # discards), against what was written after each snapshot.
    assert whole_read == 24 * MiB + 22 * MiB + 22 * MiB + 64 * KiB
    assert exact_read == 24 * MiB + 512 * KiB + 256 * KiB + 64 * KiB
