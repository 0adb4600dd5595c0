"""The live view: any format as a plain qcow2 file, checked against QEMU
and against librbd 16.2's own way of reading one.

Sources are made with qemu-img/qemu-io (a compressed qcow2 with snapshots,
a backing chain, a sparse raw file) or record by record (an export-diff
chain); each view is written to a sparse file and read back by ``qemu-img``
(check, info, convert of HEAD and every snapshot, map).  Random layered
sources (a fake format) are read back through our own ``QcowFormat``, and
their tables are compared as librbd's list-snaps compares them: through
the mask for compressed cluster offsets, which is what the view's host
layout must survive.
"""
import json
import random
import struct
import subprocess
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument
from rbd_migration.formats import open_format
from rbd_migration.formats.base import (Extent, ExtentKind, Format, PieceReader,
                                        Snapshot, coalesce)
from rbd_migration.formats.qcow import QcowFormat
from rbd_migration.live.view import COPIED, MAX_SNAPSHOTS, ZERO_FLAG, HostLayout, QcowView
from tests.profile import examples
from tests.unit.test_fuzz_parsers import diff_stream
from tests.unit.test_qcow import (SIZE, convert, ctx_for, qemu_io, reference, run,
                                  scattered_raw)

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40
OFFSET_MASK = 0x00fffffffffffe00


# -- a fake format: layers of bytes -------------------------------------------

SECTOR = 512
NOTHING, DATA, ZEROED = 0, 1, 2


class FakeLayers(PieceReader):
    """Layers given as bytes and a kind per sector (nothing, data, zero);
    ``exact``: ``changed_extents`` names exactly the sectors whose kind or
    bytes changed, else the default (everything allocated)."""

    def __init__(self, layers: Sequence[Tuple[bytes, bytes]], exact: bool = True) -> None:
        self.layers = list(layers)
        self.exact_diffs = exact
        self.reads = 0
        self._snaps = [Snapshot(f's{i}', len(data), ident=str(i))
                       for i, (data, _) in enumerate(self.layers[:-1])]

    @classmethod
    def from_spec(cls, spec: object, ctx: SourceContext) -> 'FakeLayers':
        raise NotImplementedError('made by tests only')

    def _layer(self, snap: Optional[Snapshot]) -> int:
        return len(self.layers) - 1 if snap is None else int(snap.ident)

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return len(self.layers[self._layer(snap)][0])

    def snapshots(self) -> List[Snapshot]:
        return list(self._snaps)

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        _, kinds = self.layers[self._layer(snap)]
        return coalesce(Extent(i * SECTOR, SECTOR, ExtentKind.DATA if k == DATA
                               else ExtentKind.ZERO)
                        for i, k in enumerate(kinds) if k != NOTHING)

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        if not self.exact_diffs or prev is None:
            return super().changed_extents(prev, snap)
        data, kinds = self.layers[self._layer(snap)]
        old, old_kinds = self.layers[self._layer(prev)]
        changed = []
        for i, kind in enumerate(kinds):
            at = slice(i * SECTOR, (i + 1) * SECTOR)
            was = old_kinds[i] if i < len(old_kinds) else NOTHING
            if kind != was or data[at] != old[at]:
                changed.append(Extent(i * SECTOR, SECTOR, ExtentKind.DATA if kind == DATA
                                      else ExtentKind.ZERO))
        return coalesce(changed)

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        data = self.layers[self._layer(snap)][0]
        for offset, view in pieces:
            self.reads += 1
            chunk = data[offset:offset + len(view)]
            view[:len(chunk)] = chunk
            view[len(chunk):] = bytes(len(view) - len(chunk))


def grow(data: bytes, kinds: bytes, size: int) -> Tuple[bytearray, bytearray]:
    """A layer resized to ``size`` bytes (a multiple of SECTOR)."""
    return (bytearray(data[:size]) + bytes(max(0, size - len(data))),
            bytearray(kinds[:size // SECTOR]) + bytes(max(0, size // SECTOR - len(kinds))))


Op = Tuple[str, int, int, int]    # (kind, first sector, sectors, seed)


def apply(data: bytearray, kinds: bytearray, op: Op) -> None:
    what, first, count, seed = op
    first = min(first, len(kinds))
    count = min(count, len(kinds) - first)
    at = slice(first * SECTOR, (first + count) * SECTOR)
    if what == 'w':
        data[at] = random.Random(seed).randbytes(count * SECTOR)
        kinds[first:first + count] = bytes([DATA]) * count
    else:
        data[at] = bytes(count * SECTOR)
        kinds[first:first + count] = bytes([ZEROED if what == 'z' else NOTHING]) * count


def build_layers(plan: Sequence[Tuple[int, Sequence[Op]]]) -> List[Tuple[bytes, bytes]]:
    """Each layer the one before (resized) with its ops applied."""
    layers: List[Tuple[bytes, bytes]] = []
    data, kinds = bytearray(), bytearray()
    for sectors, ops in plan:
        data, kinds = grow(data, kinds, sectors * SECTOR)
        for op in ops:
            apply(data, kinds, op)
        layers.append((bytes(data), bytes(kinds)))
    return layers


# -- reading a view's tables as librbd does -----------------------------------


def read_u64s(view: QcowView, offset: int, count: int) -> List[int]:
    return list(struct.unpack(f'>{count}Q', view.read(offset, 8 * count)))


def l1_tables(view: QcowView) -> List[Tuple[int, int]]:
    """(L1 offset, entries) of every layer, snapshots first, from the bytes."""
    return snapshot_table(view)[0]


def snapshot_table(view: QcowView) -> Tuple[List[Tuple[int, int]], int]:
    """``l1_tables``, and where the snapshot table ends."""
    header = view.read(0, 104)
    l1_size, l1_offset = struct.unpack_from('>IQ', header, 36)
    count, table = struct.unpack_from('>IQ', header, 60)
    out = []
    pos = table
    for _ in range(count):
        entry = view.read(pos, 40)
        offset, size, id_len, name_len = struct.unpack_from('>QIHH', entry)
        extra = struct.unpack_from('>I', entry, 36)[0]
        out.append((offset, size))
        pos += 40 + extra + id_len + name_len
        pos += -pos % 8
    return out + [(l1_offset, l1_size)], pos


def entries(view: QcowView) -> List[List[Optional[int]]]:
    """Per layer, the L2 entry of each guest cluster; None where the L1
    entry is 0 (no table)."""
    per = view.table_entries
    out = []
    for offset, size in l1_tables(view):
        row: List[Optional[int]] = []
        for l1 in read_u64s(view, offset, size):
            if l1 & OFFSET_MASK:
                row += read_u64s(view, l1 & OFFSET_MASK, per)
            else:
                row += [None] * per
        out.append(row[:view.index.clusters])
    return out


def librbd_deltas(view: QcowView, bits: int) -> List[List[str]]:
    """What librbd 16.2's list-snaps makes of each layer's clusters
    against the layer before (QCOWFormat's ListSnapsRequest): 'same',
    'data' or 'zeroed', comparing entries through ``(1 << bits) - 1``."""
    mask = (1 << bits) - 1
    prev: List[Optional[int]] = [None] * view.index.clusters
    out = []
    for row in entries(view):
        deltas = []
        for old, new in zip(prev, row):
            a = None if old is None else old & mask
            b = None if new is None else new & mask
            if a == b:
                deltas.append('same')
            elif (a is not None and b is None) or b == ZERO_FLAG:
                deltas.append('zeroed')
            else:
                deltas.append('data')
        out.append(deltas)
        prev = row
    return out


def check_refcounts(view: QcowView) -> None:
    """What ``qemu-img check`` counts: every host cluster's references
    (header, L1 tables, snapshot table, refcount table and blocks, L2
    tables, data) equal its refcount; HEAD's copied flags where it is 1."""
    cs = view.cluster_size
    refs: Dict[int, int] = {0: 1}
    header = view.read(0, 104)
    rt_offset, rt_clusters, nsnaps, st_offset = struct.unpack_from('>QIIQ', header, 48)
    for c in range(rt_clusters):
        refs[rt_offset // cs + c] = 1
    blocks = read_u64s(view, rt_offset, rt_clusters * cs // 8)
    for b in filter(None, blocks):
        refs[b // cs] = refs.get(b // cs, 0) + 1
    tables, end = snapshot_table(view)
    if nsnaps:
        for c in range(st_offset // cs, -(-end // cs)):
            refs[c] = 1
    for layer, (offset, size) in enumerate(tables):
        refs[offset // cs] = refs.get(offset // cs, 0) + 1
        for l1 in read_u64s(view, offset, size):
            if not l1:
                continue
            refs[(l1 & OFFSET_MASK) // cs] = refs.get((l1 & OFFSET_MASK) // cs, 0) + 1
            for l2 in read_u64s(view, l1 & OFFSET_MASK, cs // 8):
                if l2 & OFFSET_MASK:
                    host = (l2 & OFFSET_MASK) // cs
                    refs[host] = refs.get(host, 0) + 1
    per_block = cs // 2
    counted = {}
    for i, b in enumerate(blocks):
        if not b:
            continue
        values = struct.unpack(f'>{per_block}H', view.read(b, cs))
        for k, n in enumerate(values):
            if n:
                counted[i * per_block + k] = n
    assert counted == refs
    head_offset, head_size = tables[-1]
    for l1 in read_u64s(view, head_offset, head_size):
        if l1:
            assert l1 & COPIED
            for l2 in read_u64s(view, l1 & OFFSET_MASK, cs // 8):
                if l2 & OFFSET_MASK:
                    assert bool(l2 & COPIED) == (refs[(l2 & OFFSET_MASK) // cs] == 1)


# -- random layered sources ---------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from('wzd'), st.integers(0, 1600),
                         st.integers(1, 600), st.integers(0, 1 << 30)), max_size=5)
plans = st.lists(st.tuples(st.sampled_from([128, 1000, 1024, 1536, 1600, 2048]), ops),
                 min_size=1, max_size=5)


@settings(max_examples=examples(quick=60, thorough=600), deadline=None, database=None)
@given(plan=plans, exact=st.booleans(), compare_bits=st.sampled_from([None, 21, 22, 23]))
def test_random_layers_read_back_as_they_are(plan: List[Tuple[int, List[Op]]],
                                            exact: bool, compare_bits: Optional[int]) -> None:
    """Every layer reads back whole through our qcow2 reader; librbd's
    comparison sees every changed cluster change, shares what an exact
    format says is unchanged, zeroes only what held data, and never
    allocates what no layer had data in; refcounts are what QEMU counts.
    64 KiB clusters; periods of 32 to 128 clusters make large-disk
    layouts of small ones."""
    layers = build_layers(plan)
    view = QcowView(FakeLayers(layers, exact), cluster_bits=16, compare_bits=compare_bits)
    cs = view.cluster_size
    reader = QcowFormat(view)
    snaps = reader.snapshots()
    assert [s.name for s in snaps] == [f's{i}' for i in range(len(layers) - 1)]
    for (data, _), snap in zip(layers, [*snaps, None]):
        assert reader.size(snap) == len(data)
        assert reader.read(0, len(data), snap) == data
    check_refcounts(view)
    deltas = librbd_deltas(view, compare_bits or 63 - 16)
    tables = entries(view)
    had_data: Set[int] = set()
    for j, (data, kinds) in enumerate(layers):
        prev = layers[j - 1] if j else (b'', b'')
        for c in range(-(-len(data) // cs)):
            now, before = data[c * cs:(c + 1) * cs], prev[0][c * cs:(c + 1) * cs]
            sectors = slice(c * cs // SECTOR, (c + 1) * cs // SECTOR)
            if now != before[:len(now)].ljust(len(now), b'\0'):
                assert deltas[j][c] != 'same', (j, c)
            if deltas[j][c] == 'zeroed':
                assert not any(now)
            if DATA in kinds[sectors]:
                had_data.add(c)
            elif c not in had_data:
                assert tables[j][c] in (None, 0), 'a cluster no layer had data in is allocated'
            if exact and j and len(data) == len(prev[0]) and DATA in kinds[sectors] \
                    and DATA in prev[1][sectors] and now == before \
                    and kinds[sectors] == prev[1][sectors]:
                assert deltas[j][c] == 'same', ('not shared', j, c)


@settings(max_examples=examples(quick=300, thorough=3000), deadline=None, database=None)
@given(layers=st.integers(1, MAX_SNAPSHOTS + 1), clusters=st.integers(0, 1 << 24),
       period_bits=st.integers(7, 23), l2_tables=st.integers(0, 64),
       snapshot_clusters=st.integers(0, 2), picks=st.lists(st.floats(0, 1), max_size=20))
def test_host_slots_survive_librbds_comparison(layers: int, clusters: int, period_bits: int,
                                               l2_tables: int, snapshot_clusters: int,
                                               picks: List[float]) -> None:
    """Every layer's slot of a guest cluster is its own (the slots of two
    layers differ modulo the period: librbd compares entries modulo it),
    none is 0 modulo the period (an unallocated entry), all lie past the
    metadata and within the end, and the refcount blocks cover the end."""
    try:
        lay = HostLayout.plan(layers, clusters, 1 << period_bits, l2_tables,
                              snapshot_clusters, 16)
    except InvalidArgument as e:
        # A period too short for the metadata (refcount blocks included)
        # and one cluster of each layer: never at 1 MiB clusters (8 Mi).
        assert 'clusters of qcow2 metadata' in str(e) and period_bits < 20
        return
    assert lay.refcount_blocks * (1 << 15) >= lay.end
    if not clusters:
        return
    for c in {0, clusters - 1, *(int(p * (clusters - 1)) for p in picks)}:
        slots = [lay.slot(j, c) for j in range(layers)]
        residues = {s % lay.period for s in slots}
        assert len(residues) == layers and 0 not in residues
        for j, slot in enumerate(slots):
            assert lay.data_start <= slot < lay.end
            assert lay.locate(slot) == (j, c)


def test_new_data_never_looks_unallocated_to_librbd() -> None:
    """Periods of 32 clusters, 8 of metadata: laid out back to back, HEAD's
    slot of cluster 8 would be 32, which librbd compares as 0, the
    snapshot's unallocated entry: it would skip the cluster."""
    layers = build_layers([(2048, [('w', 0, 10, 1)]), (2048, [('w', 0, 2048, 2)])])
    view = QcowView(FakeLayers(layers), cluster_bits=16, compare_bits=21)
    assert view.layout.data_start == 8
    assert librbd_deltas(view, 21)[1] == ['data'] * 16


def test_more_snapshots_than_librbd_takes_are_refused() -> None:
    layers = [(bytes(SECTOR), bytes(1))] * (MAX_SNAPSHOTS + 2)
    QcowView(FakeLayers(layers[1:]))
    with pytest.raises(InvalidArgument) as exc:
        QcowView(FakeLayers(layers))
    assert f'{MAX_SNAPSHOTS + 1} snapshots' in str(exc.value)
    assert '"engine": "adapter"' in str(exc.value)


def test_a_size_librbd_refuses_is_refused() -> None:
    with pytest.raises(InvalidArgument) as exc:
        QcowView(FakeLayers([(bytes(1000), bytes(2))]))
    assert 'not a multiple of 512' in str(exc.value)


def test_a_10_tib_sparse_source_builds_small() -> None:
    """Building reads nothing but extents and holds a few kilobytes: L1
    tables of 80 entries, no L2 table until one is read; reading one
    builds that table alone."""
    size = 10 * TiB

    class Sparse(FakeLayers):
        """Data at the start, the middle and the end; a snapshot per
        layer but HEAD; every layer writes the middle again."""

        def __init__(self) -> None:
            super().__init__([(b'', b'')] * 4)
            self.walks = 0

        def size(self, snap: Optional[Snapshot] = None) -> int:
            return size

        def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
            self.walks += 1
            return iter([Extent(0, MiB), Extent(size // 2, 4 * KiB),
                         Extent(size - 2 * MiB, MiB)])

        def changed_extents(self, prev: Optional[Snapshot],
                            snap: Optional[Snapshot]) -> Iterator[Extent]:
            self.walks += 1
            return iter([Extent(size // 2, 4 * KiB)])

        def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                        snap: Optional[Snapshot] = None) -> None:
            for offset, view in pieces:
                self.reads += 1
                view[:] = bytes([self._layer(snap) + 1]) * len(view)

    fmt = Sparse()
    tracemalloc.start()
    try:
        view = QcowView(fmt)
        built = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert built < MiB
    assert fmt.reads == 0 and fmt.walks == 4 + 3
    assert view.l1_entries == 80
    assert [len(t) for t in view._tables] == [3, 3, 3, 3]
    assert view.size() < 64 * TiB
    reader = QcowFormat(view)
    assert reader.size() == size and len(reader.snapshots()) == 3
    tracemalloc.start()
    try:
        assert reader.read(size // 2, 4 * KiB) == bytes([4]) * 4 * KiB
        assert reader.read(size // 2, 4 * KiB, reader.snapshots()[1]) == bytes([2]) * 4 * KiB
        assert reader.read(MiB, 4 * KiB) == bytes(4 * KiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB
    # The start is shared: HEAD reads snapshot 0's cluster, which the view
    # reads from the format at that snapshot.
    assert reader.read(0, 4 * KiB) == bytes([1]) * 4 * KiB
    deltas = librbd_deltas_at(view, [0, (size // 2) >> 20, (size >> 20) - 2])
    assert deltas == [['data', 'data', 'data'], ['same', 'data', 'same'],
                      ['same', 'data', 'same'], ['same', 'data', 'same']]


def test_read_ahead_passes_over_windows_of_holes(monkeypatch: pytest.MonkeyPatch) -> None:
    """librbd asks for nothing where the source has no data, so the
    windows loaded ahead of a read are the next ones holding data, however
    many windows of holes lie between (a sparse source's data windows were
    otherwise each read on demand, the copy waiting)."""
    window = 4 * MiB
    data_windows = [0, 1, 5, 9, 10]
    size = 12 * window
    data = bytearray(size)
    kinds = bytearray(size // SECTOR)
    for w in data_windows:
        data[w * window:(w + 1) * window] = bytes([w + 1]) * window
        kinds[w * window // SECTOR:(w + 1) * window // SECTOR] = bytes([DATA]) * (window // SECTOR)
    view = QcowView(FakeLayers([(bytes(data), bytes(kinds))]))
    ahead: List[int] = []
    monkeypatch.setattr(view._windows, 'prefetch',
                        lambda layer, index, pool: ahead.append(index))
    reader = QcowFormat(view)
    try:
        assert reader.read(window, 4 * KiB) == bytes([2]) * 4 * KiB   # window 1
        assert ahead == [5, 9]
        ahead.clear()
        assert reader.read(9 * window, 4 * KiB) == bytes([10]) * 4 * KiB
        assert ahead == [10]                                           # nothing after it
        ahead.clear()
        assert reader.read(10 * window + MiB, 4 * KiB) == bytes([11]) * 4 * KiB
        assert ahead == []
    finally:
        view.close()


def test_a_dropped_windows_buffer_is_reused_only_once_no_reader_copies_from_it() -> None:
    """Window buffers are recycled (a fresh 4 MiB per load faulted in 1,024
    pages), but never while a reader still copies from the window."""
    from rbd_migration.live import view as V
    window = V.WINDOW

    def load(layer: int, index: int) -> 'V._Window':
        loaded = windows.buffer(index * window, window)
        loaded.data[:] = bytes([index + 1]) * window
        return loaded
    windows = V._Windows(load, 2 * window)
    pinned = windows.get(0, 0)
    windows.unpin(windows.get(0, 1))
    windows.unpin(windows.get(0, 2))        # drops window 0, which is pinned
    assert pinned.dropped and bytes(pinned.data[:1]) == b'\x01'
    for index in range(3, 7):               # loads that need buffers meanwhile
        windows.unpin(windows.get(0, index))
        assert bytes(pinned.data[-1:]) == b'\x01'
    windows.unpin(pinned)                   # now it may serve another load
    backing = pinned.backing
    assert any(windows.buffer(0, window).backing is backing for _ in range(V.SPARE_WINDOWS))


def test_readers_racing_over_few_windows_read_every_byte_right() -> None:
    """Eight threads read random clusters of a 48 MiB view whose cache
    holds two windows, so windows are dropped and their buffers reused
    while others read: every read returns the source's bytes."""
    import threading
    from rbd_migration.live import view as V
    size = 48 * MiB
    data = random.Random(3).randbytes(size)
    view = QcowView(FakeLayers([(data, bytes([DATA]) * (size // SECTOR))]))
    view._windows._budget = 2 * V.WINDOW
    reader = QcowFormat(view)
    rng = random.Random(4)
    plans = [[rng.randrange(0, size - 64 * KiB) for _ in range(40)] for _ in range(8)]
    wrong: List[int] = []

    def read(offsets: List[int]) -> None:
        for at in offsets:
            if reader.read(at, 64 * KiB) != data[at:at + 64 * KiB]:
                wrong.append(at)
    threads = [threading.Thread(target=read, args=(plan,)) for plan in plans]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        view.close()
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def librbd_deltas_at(view: QcowView, clusters: List[int]) -> List[List[str]]:
    """``librbd_deltas`` for a few clusters of a large view."""
    per, mask = view.table_entries, (1 << (63 - view.cluster_bits)) - 1
    out = []
    prev: List[Optional[int]] = [None] * len(clusters)
    for offset, size in l1_tables(view):
        l1 = read_u64s(view, offset, size)
        row: List[Optional[int]] = []
        for c in clusters:
            table = l1[c // per] & OFFSET_MASK
            row.append(read_u64s(view, table + 8 * (c % per), 1)[0] & mask if table else None)
        out.append(['same' if a == b else 'zeroed' if b == ZERO_FLAG or b is None
                     else 'data' for a, b in zip(prev, row)])
        prev = row
    return out


# -- against QEMU -------------------------------------------------------------


def write_view(view: QcowView, path: Path) -> Path:
    """The view as a sparse file: what it says is allocated, written."""
    with open(path, 'wb') as f:
        f.truncate(view.size())
        for offset, length in view.allocated(0, view.size()):
            f.seek(offset)
            f.write(view.read(offset, length))
    return path


def qemu_json(*args: str) -> Any:
    proc = subprocess.run(['qemu-img', *args, '--output=json'], check=True,
                          stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout)


def data_clusters(img: Path, cluster: int = MiB) -> Set[int]:
    """The clusters ``qemu-img map`` says hold data (at any depth)."""
    out: Set[int] = set()
    for r in qemu_json('map', str(img)):
        if r['data']:
            out.update(range(r['start'] // cluster, -(-(r['start'] + r['length']) // cluster)))
    return out


def check_with_qemu(view: QcowView, img: Path, source: Optional[Path],
                    fmt: Format) -> Path:
    """The view's file passes ``qemu-img check``, lists the snapshots,
    reads as the source (QEMU's reading of it, or the format's) at HEAD
    and at every snapshot, and holds data in no cluster the source has
    none in."""
    write_view(view, img)
    proc = subprocess.run(['qemu-img', 'check', str(img)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0 and 'No errors were found' in proc.stdout, proc.stdout
    info = qemu_json('info', str(img))
    assert [s['name'] for s in info.get('snapshots', [])] == \
        [s.name for s in fmt.snapshots()]
    for snap in [*fmt.snapshots(), None]:
        got = reference(img, snap.name if snap else None)
        if source is not None:
            assert got == reference(source, snap.name if snap else None), snap
        size = fmt.size(snap)
        assert got[:size] == fmt.read(0, size, snap) and not any(got[size:]), snap
    if source is not None:
        assert data_clusters(img) == data_clusters(source)
    return img


def test_compressed_qcow2_with_snapshots(tmp_path: Path) -> None:
    raw = scattered_raw(tmp_path / 'disk.raw', seed=7)
    src = convert(raw, tmp_path / 'src.qcow2', 'cluster_size=64k', compress=True)
    run('qemu-img', 'snapshot', '-c', 'first', str(src))
    qemu_io(src, 'write -P 0x61 100k 50k', 'write -z 2M 1M', 'discard 4M 1M')
    run('qemu-img', 'snapshot', '-c', 'second', str(src))
    qemu_io(src, 'write -P 0x62 3M 64k', 'write -P 0x63 5M 4k')
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(src)}}
    ctx = ctx_for(tmp_path)
    with QcowView.from_spec(spec, ctx) as view, open_format(spec, ctx) as fmt:
        assert fmt.features.compressed
        assert isinstance(view, QcowView)
        check_with_qemu(view, tmp_path / 'view.qcow2', src, fmt)


def test_backing_chain(tmp_path: Path) -> None:
    """base (raw-converted, 64 KiB clusters) <- mid (a snapshot) <- top."""
    base = convert(scattered_raw(tmp_path / 'base.raw', 4 * MiB, seed=3),
                   tmp_path / 'base.qcow2', 'cluster_size=64k')
    for name, below in (('mid.qcow2', 'base.qcow2'), ('top.qcow2', 'mid.qcow2')):
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', below, '-F', 'qcow2',
            '-o', 'cluster_size=4k', str(tmp_path / name), str(SIZE), cwd=tmp_path)
    qemu_io(tmp_path / 'mid.qcow2', 'write -P 0x71 1M 8k', 'write -z 2M 64k')
    run('qemu-img', 'snapshot', '-c', 'mid-snap', str(tmp_path / 'mid.qcow2'))
    qemu_io(tmp_path / 'top.qcow2', 'write -P 0x72 5M 4k', 'write -z 0 4k')
    top = tmp_path / 'top.qcow2'
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(top)}}
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        assert fmt.features.backing_file == 'mid.qcow2' and base.exists()
        check_with_qemu(QcowView(fmt), tmp_path / 'view.qcow2', top, fmt)


def test_sparse_raw_file(tmp_path: Path) -> None:
    raw = tmp_path / 'disk.raw'
    with open(raw, 'wb') as f:
        f.truncate(9 * MiB)
        for offset in (0, 3 * MiB + 4096, 8 * MiB + 512 * KiB):
            f.seek(offset)
            f.write(random.Random(offset).randbytes(20000))
    spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(raw)}}
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        view = QcowView(fmt)
        img = check_with_qemu(view, tmp_path / 'view.qcow2', None, fmt)
        assert data_clusters(img) == {0, 3, 8}


def test_export_diff_chain_shares_what_did_not_change(tmp_path: Path) -> None:
    """s1 (a base diff), s2 (one write, one zeroing of data), HEAD (grown,
    one write): librbd would copy s1's clusters once and see s2 and HEAD
    change only where their diffs wrote."""
    base, _ = diff_stream([('w', 0, random.Random(1).randbytes(3 * MiB)),
                           ('w', 4 * MiB, b'\x5a' * 70000)], 2, to_snap='s1', size=6 * MiB)
    d1, _ = diff_stream([('w', MiB + 100, b'\x11' * 5000), ('z', 4 * MiB, 70000)], 2,
                        from_snap='s1', to_snap='s2', size=6 * MiB)
    d2, _ = diff_stream([('w', 7 * MiB, b'\x22' * 512)], 2, from_snap='s2', to_snap=None,
                        size=8 * MiB)
    for name, data in (('base', base), ('d1', d1), ('d2', d2)):
        (tmp_path / name).write_bytes(data)

    def file(name: str) -> Dict[str, str]:
        return {'type': 'file', 'file_path': str(tmp_path / name)}
    spec = {'type': 'export-diff', 'stream': file('base'),
            'diffs': [{'stream': file('d1')}, {'stream': file('d2')}]}
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        view = QcowView(fmt)
        check_with_qemu(view, tmp_path / 'view.qcow2', None, fmt)
        deltas = librbd_deltas(view, 63 - view.cluster_bits)
    # librbd lists the unallocated entries of a first table as data (and
    # reads nothing for them): cluster 3 is one.
    assert deltas[0][:5] == ['data'] * 5 and entries(view)[0][3] == 0
    assert deltas[1][:6] == ['same', 'data', 'same', 'same', 'zeroed', 'same']
    assert deltas[2] == ['same'] * 7 + ['data']


def test_a_large_disk_layout_passes_qemu_check(tmp_path: Path) -> None:
    """Periods of 64 clusters (as a 10 TiB disk lays out at 1 MiB): QEMU
    reads every layer and finds the refcounts right."""
    layers = build_layers([(2048, [('w', 0, 100, 1), ('w', 1500, 300, 2)]),
                           (4096, [('w', 1000, 2000, 3), ('z', 0, 10, 0)]),
                           (4096, [('d', 1500, 300, 0), ('w', 4000, 50, 4)])])
    fmt = FakeLayers(layers)
    view = QcowView(fmt, cluster_bits=16, compare_bits=22)
    assert view.layout.per_layer < view.index.clusters
    check_with_qemu(view, tmp_path / 'view.qcow2', None, fmt)
