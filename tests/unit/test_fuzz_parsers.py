"""Byte-level fuzzing of the format parsers.

Whoever may run ``migration prepare`` picks the bytes the mgr parses in its
own process.  Whatever they are, opening and probing a source (open, size,
snapshots, features, a walk over the extents, one read) must either work or
fail with one ``MigrationError`` -- never another exception -- within
TIME_LIMIT seconds and HEAP_LIMIT bytes of Python heap (tracemalloc's peak).

The inputs start from real images made here with ``qemu-img`` (qcow2 v2 and
v3, with an internal snapshot, compressed, an overlay on a backing file,
extended L2, qcow v1) and from ``rbd export-diff`` / ``rbd export
--export-format 2`` streams built record by record, then have bytes changed
in their header, tables, snapshot table, extensions or records.  Hypothesis
runs derandomized, FUZZ_EXAMPLES examples a target; set
``RBD_MIGRATION_FUZZ_EXAMPLES`` (say 5000) for a thorough run.

Deterministic cases cover what random changes rarely reach: counts of 2**31,
512 snapshots with the largest entries, ten million records, chains past
the depth limit, a deadline or a cancel during a long walk, and data
clusters past the end of the file (read as QEMU reads them, and flagged).
"""
import os
import struct
import subprocess
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rbd_migration.context import SourceContext
from rbd_migration.errors import (Cancelled, InvalidArgument, MigrationError,
                                  TimedOut, Unsupported)
from rbd_migration.formats import open_format
from rbd_migration.formats.base import Format, Snapshot
from rbd_migration.formats.qcow import QcowFormat
from rbd_migration.limits import SourceLimits
from rbd_migration.probe import probe as probe_source
from tests.profile import THOROUGH, examples

KiB, MiB = 1 << 10, 1 << 20
TIME_LIMIT = 2.0
HEAP_LIMIT = 16 * MiB
#: Extents walked per snapshot: far more than the small images here have.
MAX_EXTENTS = 10_000
FUZZ_EXAMPLES = int(os.environ.get('RBD_MIGRATION_FUZZ_EXAMPLES') or
                    examples(quick=150, thorough=2000))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=not THOROUGH, deadline=None,
                database=None, suppress_health_check=list(HealthCheck))


# -- probing, bounded ---------------------------------------------------------


def file_spec(path: Path) -> Dict[str, Any]:
    return {'type': 'file', 'file_path': str(path)}


def ctx_for(root: Path, **kwargs: Any) -> SourceContext:
    return SourceContext(allowed_file_roots=[str(root)], **kwargs)


def walk_and_read(fmt: Format, snap: Optional[Snapshot]) -> None:
    """The extents (up to MAX_EXTENTS) and a read where the first begins,
    by both read paths."""
    first: Optional[int] = None
    for extent in islice(fmt.extents(snap), MAX_EXTENTS):
        first = extent.offset if first is None else first
    at = first or 0
    data = fmt.read(at, 4096, snap)
    assert len(data) == 4096
    buf = bytearray(4096)
    fmt.read_into(at, memoryview(buf), snap)


def probe(spec: Dict[str, Any], ctx: SourceContext) -> None:
    """What the probe does, and a little more: every snapshot's extents
    (the first few) and the changes between two of them."""
    with open_format(spec, ctx) as fmt:
        fmt.size()
        snaps = fmt.snapshots()
        fmt.features       # qcow2: a scan of every L2 table
        fmt.image_metadata()
        fmt.protected_snapshots()
        for snap in [None] + snaps[:3]:
            walk_and_read(fmt, snap)
        if snaps:
            list(islice(fmt.changed_extents(snaps[0], None), MAX_EXTENTS))


@dataclass
class Cost:
    error: Optional[MigrationError]
    seconds: float      # wall clock
    cpu: float          # this process's CPU time
    peak: int


def measure(action: Callable[[], None], heap: bool = True) -> Cost:
    """Run ``action``: a MigrationError is its answer, anything else fails
    the test.  ``heap``: trace the Python heap meanwhile (which slows
    allocation-heavy code several times over)."""
    if heap:
        tracemalloc.start()
    start, cpu = time.monotonic(), time.process_time()
    error: Optional[MigrationError] = None
    try:
        action()
    except MigrationError as e:
        error = e
    finally:
        seconds = time.monotonic() - start
        cpu = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1] if heap else 0
        if heap:
            tracemalloc.stop()
    if error is not None:
        assert str(error) and '\n' not in str(error), repr(str(error))
    return Cost(error, seconds, cpu, peak)


def bounded_probe(spec: Dict[str, Any], ctx: SourceContext,
                  time_limit: float = TIME_LIMIT,
                  heap_limit: int = HEAP_LIMIT) -> Optional[MigrationError]:
    cost = measure(lambda: probe(spec, ctx))
    assert cost.seconds <= time_limit, f'{cost.seconds:.2f} s ({cost.error})'
    assert cost.peak <= heap_limit, f'{cost.peak / MiB:.1f} MiB ({cost.error})'
    return cost.error


# -- making images ------------------------------------------------------------


def run(*args: str, cwd: Optional[Path] = None) -> None:
    proc = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f'{" ".join(args)}: {proc.stdout}'


def qemu_io(img: Path, *commands: str, fmt: str = 'qcow2') -> None:
    args = ['qemu-io', '-f', fmt]
    for command in commands:
        args += ['-c', command]
    run(*args, str(img))


def create(img: Path, size: str, opts: str = '', *extra: str) -> Path:
    args = ['qemu-img', 'create', '-q', '-f', 'qcow2']
    if opts:
        args += ['-o', opts]
    run(*args, *extra, str(img), size, cwd=img.parent)
    return img


def pattern(length: int, seed: int) -> bytes:
    """Compressible but not uniform bytes."""
    return bytes((i * seed // 7 + seed) % 251 for i in range(length))


def reference(img: Path) -> bytes:
    """The disk as ``qemu-img convert`` reads it."""
    out = img.with_name(img.name + '.raw')
    run('qemu-img', 'convert', '-O', 'raw', str(img), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


Regions = Dict[str, Tuple[int, int]]


@dataclass
class QcowLayout:
    """Where a qcow2 (or qcow v1) file keeps what the reader parses."""

    version: int
    cluster_size: int
    l1_offset: int
    l1_size: int
    snapshots_offset: int
    nb_snapshots: int
    header_length: int
    l2_offsets: List[int]

    @classmethod
    def of(cls, data: bytes) -> 'QcowLayout':
        version = struct.unpack_from('>I', data, 4)[0]
        if version == 1:
            size, cluster_bits, l2_bits = struct.unpack_from('>QBB', data, 24)
            l1_offset = struct.unpack_from('>Q', data, 40)[0]
            shift = cluster_bits + l2_bits
            l1_size = -(-size // (1 << shift))
            snaps = (0, 0)
            header_length = 48
        else:
            cluster_bits = struct.unpack_from('>I', data, 20)[0]
            l1_size, l1_offset = struct.unpack_from('>IQ', data, 36)
            snaps = struct.unpack_from('>IQ', data, 60)
            header_length = struct.unpack_from('>I', data, 100)[0] \
                if version == 3 else 72
        mask = 0x00fffffffffffe00 if version > 1 else (1 << 63) - 1
        l2 = [struct.unpack_from('>Q', data, l1_offset + 8 * i)[0] & mask
              for i in range(l1_size)]
        return cls(version, 1 << cluster_bits, l1_offset, l1_size,
                   snaps[1], snaps[0], header_length, [o for o in l2 if o])

    def regions(self, length: int) -> Regions:
        cs = self.cluster_size
        out = {'header': (0, self.header_length),
               'l1': (self.l1_offset, self.l1_offset + 8 * self.l1_size),
               'anywhere': (0, length)}
        if self.version > 1:
            out['extensions'] = (self.header_length,
                                 min(cs, self.header_length + 512))
        for i, offset in enumerate(self.l2_offsets[:2]):
            out[f'l2[{i}]'] = (offset, offset + min(cs, 4096))
        if self.nb_snapshots:
            out['snapshot table'] = (self.snapshots_offset, min(
                length, self.snapshots_offset + 2048))
        return out


# -- building rbd streams -----------------------------------------------------

Record = Tuple[str, int, Any]   # ('w', offset, data) or ('z', offset, length)


def diff_stream(records: List[Record], version: int = 1,
                from_snap: Optional[str] = None,
                to_snap: Optional[str] = 's1', size: Optional[int] = None,
                protected: Optional[bool] = None) -> Tuple[bytes, Regions]:
    """An ``rbd export-diff`` stream, and where its parts lie."""
    def rec(tag: bytes, payload: bytes) -> bytes:
        if version == 1:
            return tag + payload
        return tag + struct.pack('<Q', len(payload)) + payload

    meta = b''
    for key, name in ((b'f', from_snap), (b't', to_snap)):
        if name is not None:
            raw = name.encode()
            meta += rec(key, struct.pack('<I', len(raw)) + raw)
    if protected is not None and version == 2:
        meta += rec(b'p', bytes([protected]))
    if size is not None:
        meta += rec(b's', struct.pack('<Q', size))
    data = b''
    for tag, offset, what in records:
        if tag == 'w':
            data += rec(b'w', struct.pack('<QQ', offset, len(what)) + what)
        else:
            data += rec(b'z', struct.pack('<QQ', offset, what))
    banner = b'rbd diff v1\n' if version == 1 else b'rbd diff v2\n'
    out = banner + meta + data + b'e'
    a, b = len(banner), len(banner) + len(meta)
    return out, {'banner': (0, a), 'metadata': (a, b),
                 'records': (b, b + len(data)), 'end': (len(out) - 1, len(out)),
                 'anywhere': (0, len(out))}


def export_stream(diffs: List[bytes], header: bytes) -> Tuple[bytes, Regions]:
    """An ``rbd export --export-format 2`` stream of ``diffs`` (v2)."""
    head = b'rbd image v2\n' + header + b'E'
    count = b'rbd image diffs v2\n' + struct.pack('<Q', len(diffs))
    out = head + count + b''.join(diffs)
    regions = {'image header': (13, len(head)),
               'diff count': (len(head), len(head) + len(count)),
               'anywhere': (0, len(out))}
    pos = len(head) + len(count)
    for i, diff in enumerate(diffs):
        regions[f'diff {i}'] = (pos, pos + len(diff))
        pos += len(diff)
    return out, regions


def header_record(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack('<Q', len(payload)) + payload


def meta_record(key: bytes, value: bytes) -> bytes:
    return header_record(b'M', struct.pack('<I', len(key)) + key
                         + struct.pack('<I', len(value)) + value)


# -- seeds --------------------------------------------------------------------


@dataclass
class Seed:
    """A valid source: ``files`` written side by side, ``target`` the one
    mutated, ``regions`` where in it."""

    spec_type: str
    files: Dict[str, bytes]
    target: str
    regions: Regions
    endian: str
    diffs: List[str] = field(default_factory=list)

    def spec(self, root: Path) -> Dict[str, Any]:
        base = self.target if self.spec_type != 'export-diff' else 'base'
        spec: Dict[str, Any] = {'type': self.spec_type,
                                'stream': file_spec(root / base)}
        if self.diffs:
            spec['diffs'] = [{'stream': file_spec(root / d)} for d in self.diffs]
        return spec

    def lay_out(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (root / name).write_bytes(data)


def qcow_seed(img: Path, *others: Path) -> Seed:
    data = img.read_bytes()
    files = {p.name: p.read_bytes() for p in others}
    files[img.name] = data
    return Seed('qcow', files, img.name,
                QcowLayout.of(data).regions(len(data)), '>')


def make_qcow_seeds(tmp: Path) -> Dict[str, Seed]:
    seeds = {}
    img = create(tmp / 'v2.qcow2', '1M', 'compat=0.10,cluster_size=4k')
    qemu_io(img, 'write -P 0x11 0 6k', 'write -P 0x12 300k 4k',
            'write -P 0x13 1020k 4k')
    seeds['qcow2 v2'] = qcow_seed(img)

    img = create(tmp / 'v3.qcow2', '2M', 'compat=1.1')
    qemu_io(img, 'write -P 0x21 0 70k', 'write -P 0x22 1M 4k')
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    qemu_io(img, 'write -P 0x23 4k 8k', 'write -z 1M 64k')
    seeds['qcow2 v3 snapshot'] = qcow_seed(img)

    raw = tmp / 'compressible.raw'
    raw.write_bytes(pattern(MiB, 3))
    img = tmp / 'compressed.qcow2'
    run('qemu-img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', str(raw),
        str(img))
    qemu_io(img, 'write -P 0x31 128k 1k')
    seeds['qcow2 compressed'] = qcow_seed(img)

    sub = tmp / 'chain'
    sub.mkdir()
    base = create(sub / 'base.qcow2', '1M', 'cluster_size=4k')
    qemu_io(base, 'write -P 0x41 0 64k', 'write -P 0x42 512k 4k')
    img = create(sub / 'overlay.qcow2', '1M', '', '-b', 'base.qcow2',
                 '-F', 'qcow2')
    qemu_io(img, 'write -P 0x43 4k 4k', 'write -z 512k 4k')
    seeds['qcow2 overlay'] = qcow_seed(img, base)

    img = create(tmp / 'ext.qcow2', '1M', 'extended_l2=on,cluster_size=64k')
    qemu_io(img, 'write -P 0x51 0 2k', 'write -P 0x52 70k 10k',
            'write -z 200k 8k')
    seeds['qcow2 extended L2'] = qcow_seed(img)

    img = tmp / 'v1.qcow'
    run('qemu-img', 'create', '-q', '-f', 'qcow', str(img), '1M')
    qemu_io(img, 'write -P 0x61 0 8k', 'write -c -P 0x62 256k 4k', fmt='qcow')
    seeds['qcow v1'] = qcow_seed(img)
    return seeds


def make_stream_seeds() -> Dict[str, Seed]:
    records: List[Record] = [('w', 0, pattern(4096, 5)), ('z', 64 * KiB, 8192),
                             ('w', 100 * KiB, b'x' * 100),
                             ('w', 100 * KiB + 100, b'y' * 50)]
    seeds = {}
    data, regions = diff_stream(records, 1, to_snap='s1', size=MiB)
    seeds['export-diff v1'] = Seed('export-diff', {'base': data}, 'base',
                                   regions, '<')

    base, _ = diff_stream(records, 2, to_snap='s1', size=MiB, protected=True)
    later, regions = diff_stream(
        [('z', 0, 512), ('w', 200 * KiB, pattern(3000, 9))], 2,
        from_snap='s1', to_snap='s2', size=2 * MiB)
    seeds['export-diff v2 chain'] = Seed(
        'export-diff', {'base': base, 'd1': later}, 'd1', regions, '<',
        diffs=['d1'])

    diffs = [diff_stream(records, 2, to_snap='s1', size=MiB,
                         protected=False)[0],
             diff_stream([('w', 8192, b'q' * 700)], 2, from_snap='s1',
                         to_snap='s2')[0],
             diff_stream([('z', 0, 4096)], 2, from_snap='s2', to_snap=None,
                         size=MiB // 2)[0]]
    header = (header_record(b'O', struct.pack('<Q', 22))
              + header_record(b'T', struct.pack('<Q', 61))
              + meta_record(b'conf_rbd_cache', b'false'))
    data, regions = export_stream(diffs, header)
    seeds['export v2'] = Seed('export', {'image.exp': data}, 'image.exp',
                              regions, '<')
    return seeds


def make_vmdk_seeds(tmp: Path) -> Dict[str, Seed]:
    """VMware disks as qemu-img writes them: hosted sparse (header, embedded
    descriptor, grain directory and tables), streamOptimized (deflated
    grains with markers, the footer), a descriptor naming a flat extent,
    and an OVA (tar headers) around a streamOptimized disk."""
    raw = tmp / 'vmdk.raw'
    raw.write_bytes(pattern(MiB, 5) + bytes(MiB))
    seeds: Dict[str, Seed] = {}
    for name, sub in (('vmdk sparse', 'monolithicSparse'),
                      ('vmdk stream', 'streamOptimized')):
        img = tmp / f'{sub}.vmdk'
        run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o', f'subformat={sub}',
            str(raw), str(img))
        data = img.read_bytes()
        seeds[name] = Seed('vmdk', {img.name: data}, img.name,
                           {'header': (0, 512), 'metadata': (512, 128 * KiB),
                            'footer': (max(0, len(data) - 1536), len(data)),
                            'all': (0, len(data))}, '<')
    run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat',
        str(raw), str(tmp / 'flat.vmdk'))
    text = (tmp / 'flat.vmdk').read_bytes()
    seeds['vmdk descriptor'] = Seed(
        'vmdk', {'flat.vmdk': text, 'flat-flat.vmdk': (tmp / 'flat-flat.vmdk').read_bytes()},
        'flat.vmdk', {'all': (0, len(text))}, '<')
    (tmp / 'vm.ovf').write_text('<Envelope/>')
    run('tar', '-C', str(tmp), '--format=ustar', '-cf', str(tmp / 'vm.ova'), 'vm.ovf',
        'streamOptimized.vmdk')
    ova = (tmp / 'vm.ova').read_bytes()
    seeds['ova'] = Seed('ova', {'vm.ova': ova}, 'vm.ova',
                        {'tar headers': (0, 2048), 'disk': (2048, len(ova))}, '<')
    return seeds


@pytest.fixture(scope='module')
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Seed]:
    out = make_qcow_seeds(tmp_path_factory.mktemp('seeds'))
    out.update(make_stream_seeds())
    out.update(make_vmdk_seeds(tmp_path_factory.mktemp('vmdk-seeds')))
    return out


SEED_NAMES = ['qcow2 v2', 'qcow2 v3 snapshot', 'qcow2 compressed',
              'qcow2 overlay', 'qcow2 extended L2', 'qcow v1',
              'export-diff v1', 'export-diff v2 chain', 'export v2',
              'vmdk sparse', 'vmdk stream', 'vmdk descriptor', 'ova']


# -- mutations ----------------------------------------------------------------

OPS = ('byte', 'flip', 'u16', 'u32', 'u64', 'truncate', 'repeat', 'delete')
_WIDTHS = {'u16': ('H', 2), 'u32': ('I', 4), 'u64': ('Q', 8)}
INTERESTING = [0, 1, 2, 7, 8, 9, 16, 21, 22, 255, 256, 511, 512, 4095, 4096,
               65535, 65536, 1 << 20, 1 << 21, (1 << 31) - 1, 1 << 31,
               (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 55, 1 << 56, 1 << 62,
               1 << 63, (1 << 64) - 1, 0x8000000000000000 | 0x10000,
               0x4000000000000000 | 0x10000]
Mutation = Tuple[str, int, str, int]


def mutations(regions: Regions) -> st.SearchStrategy[List[Mutation]]:
    value = st.one_of(st.sampled_from(INTERESTING),
                      st.integers(0, (1 << 64) - 1))
    one = st.tuples(st.sampled_from(sorted(regions)), st.integers(0, 1 << 20),
                    st.sampled_from(OPS), value)
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, regions: Regions, muts: List[Mutation],
           endian: str) -> bytes:
    buf = bytearray(data)
    for region, pos, op, value in muts:
        lo, hi = regions[region]
        if hi <= lo:
            continue
        at = lo + pos % (hi - lo)
        if at >= len(buf):
            continue
        if op == 'byte':
            buf[at] = value & 0xff
        elif op == 'flip':
            buf[at] ^= 1 << (value % 8)
        elif op in _WIDTHS:
            code, width = _WIDTHS[op]
            if at + width <= len(buf):
                struct.pack_into(endian + code, buf, at,
                                 value & ((1 << (8 * width)) - 1))
        elif op == 'truncate':
            del buf[at:]
        elif op == 'repeat':
            chunk = buf[at:at + 1 + value % 64]
            buf[at:at] = chunk * (1 + (value >> 8) % 16)
        else:
            del buf[at:at + 1 + value % 64]
    return bytes(buf)


# -- the fuzz targets ---------------------------------------------------------


@pytest.mark.parametrize('name', SEED_NAMES)
def test_seed_opens_cleanly(seeds: Dict[str, Seed], tmp_path: Path,
                            name: str) -> None:
    """Unchanged, every seed probes without error (so that errors seen
    under mutation are the mutation's)."""
    seed = seeds[name]
    seed.lay_out(tmp_path)
    assert bounded_probe(seed.spec(tmp_path), ctx_for(tmp_path)) is None


@pytest.mark.parametrize('name', SEED_NAMES)
@FUZZ
@given(data=st.data())
def test_mutated_bytes_fail_cleanly(seeds: Dict[str, Seed],
                                    tmp_path_factory: pytest.TempPathFactory,
                                    name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    root = tmp_path_factory.getbasetemp() / 'fuzz' / name.replace(' ', '-')
    if not root.exists():
        seed.lay_out(root)
    muts = data.draw(mutations(seed.regions), label='mutations')
    target = mutate(seed.files[seed.target], seed.regions, muts, seed.endian)
    (root / seed.target).write_bytes(target)
    # A deadline past the time bound turns a hang into a failure.
    ctx = ctx_for(root).bounded(2 * TIME_LIMIT, 'the fuzzed probe')
    bounded_probe(seed.spec(root), ctx)


# -- qcow2: counts and sizes past every bound ---------------------------------


def patched(seed: Seed, root: Path, *changes: Tuple[int, str, int],
            tail: bytes = b'', grow_to: int = 0) -> Dict[str, Any]:
    """``seed`` laid out in ``root`` with big-endian ``(offset, code,
    value)`` changes, ``tail`` appended and the file grown (sparse)."""
    seed.lay_out(root)
    path = root / seed.target
    buf = bytearray(seed.files[seed.target])
    for offset, code, value in changes:
        struct.pack_into('>' + code, buf, offset, value)
    path.write_bytes(bytes(buf) + tail)
    if grow_to > path.stat().st_size:
        os.truncate(path, grow_to)
    return seed.spec(root)


@pytest.mark.parametrize('offset,code,value,error,words', [
    (36, 'I', 1 << 31, InvalidArgument, 'L1 table has 2147483648 entries'),
    (36, 'I', (1 << 32) - 1, InvalidArgument, 'L1 table'),
    (40, 'Q', (1 << 64) - 512, InvalidArgument, 'L1 table'),
    (60, 'I', 1 << 31, InvalidArgument, '2147483648 snapshots'),
    (60, 'I', 513, InvalidArgument, 'source_max_snapshots'),
    (24, 'Q', 1 << 62, InvalidArgument, 'L1 table has'),
    (64, 'Q', (1 << 64) - 65536, InvalidArgument, 'snapshot table'),
])
def test_qcow2_huge_header_fields(seeds: Dict[str, Seed], tmp_path: Path,
                                  offset: int, code: str, value: int,
                                  error: type, words: str) -> None:
    spec = patched(seeds['qcow2 v3 snapshot'], tmp_path, (offset, code, value))
    caught = bounded_probe(spec, ctx_for(tmp_path))
    assert isinstance(caught, error) and words in str(caught), caught
    assert str(caught).startswith('source-spec: stream: file ')


def test_qcow2_l1_table_past_the_metadata_limit(tmp_path: Path) -> None:
    """512-byte clusters: a 512 MiB disk needs a 128 KiB L1 table."""
    img = create(tmp_path / 'small-clusters.qcow2', '512M', 'cluster_size=512')
    spec = {'type': 'qcow', 'stream': file_spec(img)}
    assert bounded_probe(spec, ctx_for(tmp_path)) is None
    tight = SourceLimits(metadata_bytes=64 * KiB)
    caught = bounded_probe(spec, ctx_for(tmp_path, limits=tight))
    assert isinstance(caught, InvalidArgument)
    assert str(caught) == (
        f'source-spec: stream: file {img}: the active L1 table of the qcow2 '
        f'image (bytes) needs {128 * KiB}, past the limit of {64 * KiB} (ceph '
        'config set mgr mgr/rbd_migration/source_max_metadata_bytes to raise '
        'it)')


SNAPSHOT_ENTRY = struct.Struct('>QIHHIIQII')


def snapshot_table(count: int, l1_offset: int, l1_size: int,
                   extra_len: int = 1024, name_len: int = 4096,
                   disk_size: int = 2 * MiB) -> bytes:
    """``count`` snapshot entries sharing one L1 table, with the most extra
    data QEMU allows and the longest names we keep."""
    out = bytearray()
    for i in range(count):
        ident = str(i + 1).encode().rjust(min(name_len, 4096), b'0')
        name = (b'snap-%d-' % i).ljust(name_len, b'x')
        # A length past QEMU's bound is refused before the bytes are read:
        # the file need not hold them.
        written = min(extra_len, 2048)
        extra = struct.pack('>QQ', 0, disk_size).ljust(written, b'\0') \
            if written >= 16 else bytes(written)
        out += SNAPSHOT_ENTRY.pack(l1_offset, l1_size, len(ident), len(name),
                                   0, 0, 0, 0, extra_len)
        out += extra + ident + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def with_snapshot_table(seed: Seed, root: Path, table: bytes,
                        count: int) -> Dict[str, Any]:
    layout = QcowLayout.of(seed.files[seed.target])
    size = len(seed.files[seed.target])
    at = -(-size // layout.cluster_size) * layout.cluster_size
    pad = bytes(at - size)
    return patched(seed, root, (60, 'I', count), (64, 'Q', at),
                   tail=pad + table)


def test_qcow2_most_snapshots_with_the_largest_entries(
        seeds: Dict[str, Seed], tmp_path: Path) -> None:
    seed = seeds['qcow2 v3 snapshot']
    layout = QcowLayout.of(seed.files[seed.target])
    limit = SourceLimits().snapshots
    table = snapshot_table(limit, layout.l1_offset, layout.l1_size)
    spec = with_snapshot_table(seed, tmp_path, table, limit)
    assert bounded_probe(spec, ctx_for(tmp_path)) is None
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        assert len(fmt.snapshots()) == limit


@pytest.mark.parametrize('kwargs,error,words', [
    ({'extra_len': (1 << 32) - 1}, InvalidArgument, 'bytes of extra data'),
    ({'extra_len': 1025}, InvalidArgument, 'bytes of extra data'),
    ({'name_len': 4097}, Unsupported, 'snapshot 0 has a name or id of 4097'),
    ({'name_len': 65535}, Unsupported, 'snapshot 0 has a name or id'),
])
def test_qcow2_snapshot_entries_past_the_bounds(
        seeds: Dict[str, Seed], tmp_path: Path, kwargs: Dict[str, int],
        error: type, words: str) -> None:
    seed = seeds['qcow2 v3 snapshot']
    layout = QcowLayout.of(seed.files[seed.target])
    table = snapshot_table(1, layout.l1_offset, layout.l1_size, **kwargs)
    spec = with_snapshot_table(seed, tmp_path, table, 300)
    caught = bounded_probe(spec, ctx_for(tmp_path))
    assert isinstance(caught, error) and words in str(caught), caught


def test_qcow2_snapshot_table_runs_past_the_end(seeds: Dict[str, Seed],
                                                tmp_path: Path) -> None:
    seed = seeds['qcow2 v3 snapshot']
    layout = QcowLayout.of(seed.files[seed.target])
    table = snapshot_table(3, layout.l1_offset, layout.l1_size)
    spec = with_snapshot_table(seed, tmp_path, table, 512)
    caught = bounded_probe(spec, ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert 'snapshot table runs past the end of the file' in str(caught)


def test_backing_chain_past_the_depth_limit(tmp_path: Path) -> None:
    depth = SourceLimits().chain_depth
    create(tmp_path / 'layer0.qcow2', '1M')
    for i in range(1, depth + 1):
        create(tmp_path / f'layer{i}.qcow2', '1M', '', '-b',
               f'layer{i - 1}.qcow2', '-F', 'qcow2')
    deepest = {'type': 'qcow', 'stream': file_spec(tmp_path / f'layer{depth - 1}.qcow2')}
    assert bounded_probe(deepest, ctx_for(tmp_path)) is None
    top = tmp_path / f'layer{depth}.qcow2'
    caught = bounded_probe({'type': 'qcow', 'stream': file_spec(top)},
                           ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert str(caught).startswith(f'source-spec: stream: file {tmp_path}/')
    assert (f'the qcow2 backing chain (layers) needs {depth + 1}, past the '
            f'limit of {depth}') in str(caught)
    assert 'source_max_chain_depth' in str(caught)


def test_backing_loop_ends_at_the_depth_limit(tmp_path: Path) -> None:
    for name, under in (('a', 'b'), ('b', 'a')):
        create(tmp_path / f'{name}.qcow2', '1M', '', '-u', '-b',
               f'{under}.qcow2', '-F', 'qcow2')
    caught = bounded_probe({'type': 'qcow', 'stream': file_spec(tmp_path / 'a.qcow2')},
                           ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert 'source_max_chain_depth' in str(caught)


def test_backing_name_with_a_nul(seeds: Dict[str, Seed],
                                 tmp_path: Path) -> None:
    seed = seeds['qcow2 overlay']
    data = seed.files[seed.target]
    offset, length = struct.unpack_from('>QI', data, 8)
    assert data[offset:offset + length] == b'base.qcow2'
    spec = patched(seed, tmp_path, (offset + 4, 'B', 0))
    caught = bounded_probe(spec, ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert 'the backing file name holds a NUL byte' in str(caught)


def test_a_2mib_extended_l2_table_of_alternating_subclusters(
        tmp_path: Path) -> None:
    """One L2 table of 131072 entries, each 32 subclusters alternating data
    and zeros: four million runs, decoded a piece at a time."""
    img = create(tmp_path / 'alt.qcow2', '256G',
                 'extended_l2=on,cluster_size=2M')
    qemu_io(img, 'write -P 0x71 0 2M')
    data = bytearray(img.read_bytes())
    layout = QcowLayout.of(bytes(data))
    l2 = layout.l2_offsets[0]
    host = struct.unpack_from('>Q', data, l2)[0] & 0x00fffffffffffe00
    entry = struct.pack('>QQ', (1 << 63) | host, 0xAAAAAAAA55555555)
    data[l2:l2 + 2 * MiB] = entry * (2 * MiB // 16)
    img.write_bytes(bytes(data))
    spec = {'type': 'qcow', 'stream': file_spec(img)}
    assert bounded_probe(spec, ctx_for(tmp_path)) is None
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        assert not fmt.features.data_past_end
        assert fmt.read(64 * KiB - 2, 4) == b'\x71\x71\0\0'


# -- long walks end at the deadline or on cancel --------------------------------


@pytest.fixture(scope='module')
def long_walk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 GiB disk of 512-byte clusters whose million L1 slots all name
    one L2 table of data: its own, honest-looking, but a walk over it
    decodes 64 million clusters."""
    tmp = tmp_path_factory.mktemp('long')
    img = create(tmp / 'long.qcow2', '32G', 'cluster_size=512')
    data = bytearray(img.read_bytes())
    layout = QcowLayout.of(bytes(data))
    l2 = len(data)
    data += b''.join(struct.pack('>Q', (1 << 63) | (l2 + 512 * (1 + 2 * i)))
                     for i in range(64))
    data += bytes(512 * 130)
    data[layout.l1_offset:layout.l1_offset + 8 * layout.l1_size] = \
        struct.pack('>Q', (1 << 63) | l2) * layout.l1_size
    img.write_bytes(bytes(data))
    return img


def test_a_long_qcow2_walk_ends_at_the_deadline(long_walk: Path) -> None:
    ctx = ctx_for(long_walk.parent).bounded(0.3, 'the probe')
    cost = measure(lambda: probe({'type': 'qcow', 'stream': file_spec(long_walk)}, ctx),
                   heap=False)
    assert isinstance(cost.error, TimedOut), cost.error
    assert cost.seconds < 1.5


def test_a_long_qcow2_walk_ends_on_cancel(long_walk: Path) -> None:
    stop = threading.Event()
    ctx = ctx_for(long_walk.parent, stop=stop)
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        cost = measure(lambda: probe({'type': 'qcow', 'stream': file_spec(long_walk)}, ctx),
                       heap=False)
    finally:
        timer.cancel()
    assert isinstance(cost.error, Cancelled), cost.error
    assert cost.seconds < 1.5


# -- data past the end of the file ---------------------------------------------


def moved_cluster(img: Path, out: Path, host: Callable[[int, int], int],
                  truncate_to: Callable[[int, int], Optional[int]]) -> Path:
    """A copy of ``img`` whose second guest cluster's L2 entry is moved to
    ``host(old_host, file_size)``, the file then cut to ``truncate_to``."""
    data = bytearray(img.read_bytes())
    layout = QcowLayout.of(bytes(data))
    at = layout.l2_offsets[0] + 8
    entry = struct.unpack_from('>Q', data, at)[0]
    old = entry & 0x00fffffffffffe00
    struct.pack_into('>Q', data, at, (entry & ~0x00fffffffffffe00)
                     | host(old, len(data)))
    cut = truncate_to(old, len(data))
    out.write_bytes(bytes(data[:cut] if cut is not None else data))
    return out


@pytest.fixture(scope='module')
def past_end(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Images whose second cluster lies (partly) past the end of the file,
    as a crafted or truncated file has them; QEMU never writes them."""
    tmp = tmp_path_factory.mktemp('past-end')
    img = create(tmp / 'good.qcow2', '1M')
    qemu_io(img, 'write -P 0x41 0 64k', 'write -P 0x42 64k 64k')
    cs = 64 * KiB
    return {
        'good': img,
        'far past': moved_cluster(img, tmp / 'far.qcow2',
                                  lambda old, size: size + 10 * cs,
                                  lambda old, size: None),
        'at the end': moved_cluster(img, tmp / 'at-end.qcow2',
                                    lambda old, size: size,
                                    lambda old, size: None),
        'partly': moved_cluster(img, tmp / 'partly.qcow2',
                                lambda old, size: old,
                                lambda old, size: old + 1000),
    }


@pytest.mark.parametrize('name', ['good', 'far past', 'at the end', 'partly'])
def test_data_past_the_end_reads_as_qemu_reads_it(past_end: Dict[str, Path],
                                                  name: str) -> None:
    """QEMU reads the bytes of a data cluster past the end of the file as
    zeros (``qemu-img check`` reports the cluster, ``convert`` succeeds);
    so does the reader, and the image says so (librbd reads them
    otherwise)."""
    img = past_end[name]
    with open_format({'type': 'qcow', 'stream': file_spec(img)},
                     ctx_for(img.parent)) as fmt:
        assert isinstance(fmt, QcowFormat)
        assert fmt.read(0, fmt.size()) == reference(img)
        assert fmt.features.data_past_end is (name != 'good')
    # librbd would import such an image otherwise: never its path.
    report = probe_source({'type': 'qcow', 'stream': file_spec(img)}, ctx_for(img.parent))
    assert report.path == 'adapter'
    assert any('past the end of the file' in r for r in report.reasons) is (name != 'good')


@pytest.mark.parametrize('name', ['qcow2 v2', 'qcow2 v3 snapshot',
                                  'qcow2 compressed', 'qcow2 overlay',
                                  'qcow2 extended L2', 'qcow v1'])
def test_images_qemu_wrote_have_no_data_past_the_end(
        seeds: Dict[str, Seed], tmp_path: Path, name: str) -> None:
    seed = seeds[name]
    seed.lay_out(tmp_path)
    with open_format(seed.spec(tmp_path), ctx_for(tmp_path)) as fmt:
        assert fmt.features.data_past_end is False


def test_compressed_cluster_past_the_end_is_corrupt(tmp_path: Path) -> None:
    """QEMU fails to read it (EIO); the reader names it."""
    raw = tmp_path / 'c.raw'
    raw.write_bytes(pattern(256 * KiB, 7))
    img = tmp_path / 'c.qcow2'
    run('qemu-img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', str(raw), str(img))
    data = bytearray(img.read_bytes())
    at = QcowLayout.of(bytes(data)).l2_offsets[0]
    entry = struct.unpack_from('>Q', data, at)[0]
    assert entry & (1 << 62)
    shift = 62 - 8       # 64 KiB clusters: 8 bits of sector count
    struct.pack_into('>Q', data, at, (entry & ~((1 << shift) - 1))
                     | (len(data) + 4 * 64 * KiB))
    img.write_bytes(bytes(data))
    proc = subprocess.run(['qemu-img', 'convert', '-O', 'raw', str(img),
                           str(tmp_path / 'out.raw')], capture_output=True)
    assert proc.returncode != 0
    caught = bounded_probe({'type': 'qcow', 'stream': file_spec(img)},
                           ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert 'compressed cluster' in str(caught)


# -- export-diff and export: records, counts, names ----------------------------

TEN_MILLION = 10_000_000


@pytest.fixture(scope='module')
def many_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A v1 diff of ten million one-byte zero records (170 MB)."""
    path = tmp_path_factory.mktemp('records') / 'many.diff'
    head, _ = diff_stream([], 1, to_snap='s1', size=1 << 40)
    record = b'z' + struct.pack('<QQ', 12345, 1)
    with open(path, 'wb') as f:
        f.write(head[:-1])
        block = record * 100_000
        for _ in range(TEN_MILLION // 100_000):
            f.write(block)
        f.write(b'e')
    yield path
    path.unlink()


def diff_spec(path: Path) -> Dict[str, Any]:
    return {'type': 'export-diff', 'stream': file_spec(path)}


def test_ten_million_records_are_refused_in_time(many_records: Path) -> None:
    """Default limits: the index reaches ``records`` (or ``metadata_bytes``,
    28 bytes a record) and the refusal comes within the time bound (of CPU,
    while a test cluster may be busy on the same machine); the heap is then
    at most the budget, which the next test traces with smaller ones."""
    cost = measure(lambda: probe(diff_spec(many_records),
                                 ctx_for(many_records.parent)), heap=False)
    assert isinstance(cost.error, InvalidArgument), cost.error
    assert 'source_max_records' in str(cost.error) or \
        'source_max_metadata_bytes' in str(cost.error)
    assert str(cost.error).startswith(f'source-spec: stream: file {many_records}: ')
    assert cost.cpu <= TIME_LIMIT


@pytest.mark.parametrize('limits,option', [
    (SourceLimits(metadata_bytes=4 * MiB), 'source_max_metadata_bytes'),
    (SourceLimits(records=100_000), 'source_max_records'),
])
def test_ten_million_records_stay_within_the_heap(
        many_records: Path, limits: SourceLimits, option: str) -> None:
    ctx = ctx_for(many_records.parent, limits=limits)
    caught = bounded_probe(diff_spec(many_records), ctx, time_limit=10.0)
    assert isinstance(caught, InvalidArgument) and option in str(caught)


#: Limits that let the whole index be built, so that only a stop ends it.
UNBOUNDED = SourceLimits(metadata_bytes=1 << 30, records=10 ** 8)


def test_ten_million_records_end_at_the_deadline(many_records: Path) -> None:
    ctx = ctx_for(many_records.parent, limits=UNBOUNDED).bounded(0.2, 'the probe')
    cost = measure(lambda: probe(diff_spec(many_records), ctx), heap=False)
    assert isinstance(cost.error, TimedOut), cost.error
    assert cost.seconds < 1.0


def test_ten_million_records_end_on_cancel(many_records: Path) -> None:
    stop = threading.Event()
    ctx = ctx_for(many_records.parent, stop=stop, limits=UNBOUNDED)
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    try:
        cost = measure(lambda: probe(diff_spec(many_records), ctx), heap=False)
    finally:
        timer.cancel()
    assert isinstance(cost.error, Cancelled), cost.error
    assert cost.seconds < 1.0


def test_overlapping_records_are_sorted_within_the_budget(
        tmp_path: Path) -> None:
    """rbd writes records sorted and disjoint; sorting others costs more
    than their index, and that is checked before it starts."""
    records: List[Record] = [('z', (i * 7919) % 5000, 3) for i in range(5000)]
    data, _ = diff_stream(records, 1, to_snap='s1', size=MiB)
    (tmp_path / 'o.diff').write_bytes(data)
    spec = diff_spec(tmp_path / 'o.diff')
    assert bounded_probe(spec, ctx_for(tmp_path)) is None
    tight = SourceLimits(metadata_bytes=MiB)
    caught = bounded_probe(spec, ctx_for(tmp_path, limits=tight))
    assert isinstance(caught, InvalidArgument)
    assert 'sorting its overlapping records (bytes)' in str(caught)


def test_a_long_chain_of_small_diffs_fits_a_small_budget(
        tmp_path: Path) -> None:
    """Index room is reserved a batch of records at a time, and what a diff
    did not use is given back when it ends."""
    names = [f'd{i}' for i in range(100)]
    base, _ = diff_stream([('w', 0, b'a')], 1, to_snap='s0', size=MiB)
    (tmp_path / 'base').write_bytes(base)
    for i, name in enumerate(names):
        diff, _ = diff_stream([('z', i, 1)], 2, from_snap=f's{i}',
                              to_snap=f's{i + 1}')
        (tmp_path / name).write_bytes(diff)
    spec = {'type': 'export-diff', 'stream': file_spec(tmp_path / 'base'),
            'diffs': [{'stream': file_spec(tmp_path / n)} for n in names]}
    ctx = ctx_for(tmp_path, limits=SourceLimits(metadata_bytes=MiB))
    assert bounded_probe(spec, ctx) is None


def test_export_v2_with_a_huge_diff_count(tmp_path: Path) -> None:
    """A count the file could hold (it is sparse, and long enough) but past
    the snapshot limit: refused before a diff is read."""
    diff, _ = diff_stream([], 2, to_snap=None, size=MiB)
    data, regions = export_stream([diff], b'')
    at = regions['diff count'][1] - 8
    path = tmp_path / 'x.exp'
    path.write_bytes(data[:at] + struct.pack('<Q', 1_000_000) + data[at + 8:])
    os.truncate(path, 20 * MiB)
    caught = bounded_probe({'type': 'export', 'stream': file_spec(path)},
                           ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert ('the export (snapshots) needs 999999, past the limit of 512'
            in str(caught))


def test_export_v2_with_endless_image_meta(tmp_path: Path) -> None:
    """Image-meta pairs are held in a dict: their bytes are charged to the
    metadata budget."""
    diff, _ = diff_stream([], 2, to_snap=None, size=MiB)
    pairs = b''.join(meta_record(b'k%07d' % i, b'v' * 40) for i in range(200_000))
    data, _ = export_stream([diff], pairs)
    path = tmp_path / 'x.exp'
    path.write_bytes(data)
    ctx = ctx_for(tmp_path, limits=SourceLimits(metadata_bytes=4 * MiB))
    caught = bounded_probe({'type': 'export', 'stream': file_spec(path)}, ctx,
                           time_limit=10.0)
    assert isinstance(caught, InvalidArgument)
    assert 'the image-meta pairs (bytes)' in str(caught)


@pytest.mark.parametrize('raw,problem', [
    (b'', 'is empty'),
    (b'a\0b', 'holds a NUL byte'),
    (b'\xff\xfe', 'is not UTF-8'),
])
@pytest.mark.parametrize('tag', ['t', 'f'])
def test_export_diff_snapshot_names_rbd_cannot_address(
        tmp_path: Path, raw: bytes, problem: str, tag: str) -> None:
    name_record = tag.encode() + struct.pack('<I', len(raw)) + raw
    base, _ = diff_stream([], 1, to_snap='s1', size=MiB)
    later, _ = diff_stream([], 1, from_snap=None, to_snap=None)
    later = b'rbd diff v1\n' + name_record + later[len(b'rbd diff v1\n'):]
    (tmp_path / 'base').write_bytes(base)
    (tmp_path / 'd1').write_bytes(later)
    spec = {'type': 'export-diff', 'stream': file_spec(tmp_path / 'base'),
            'diffs': [{'stream': file_spec(tmp_path / 'd1')}]}
    caught = bounded_probe(spec, ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert str(caught) == (
        f"source-spec: diffs[0].stream: file {tmp_path / 'd1'}: at byte 12: "
        f"the snapshot name {problem} in the '{tag}' record, so no RBD "
        'snapshot could be addressed by it; the file is corrupt or '
        'incomplete, export it again')


def test_spec_snapshot_lists_past_the_limit(tmp_path: Path) -> None:
    """Refused before any stream is opened (none of these files exist)."""
    many = SourceLimits().snapshots + 1
    raw_spec = {'type': 'raw', 'stream': file_spec(tmp_path / 'head'),
                'snapshots': [{'type': 'raw', 'name': f's{i}',
                               'stream': file_spec(tmp_path / f's{i}')}
                              for i in range(many)]}
    caught = bounded_probe(raw_spec, ctx_for(tmp_path))
    assert str(caught) == (
        f'source-spec: snapshots: the raw source (snapshots) needs {many}, '
        f'past the limit of {many - 1} (ceph config set mgr '
        'mgr/rbd_migration/source_max_snapshots to raise it)')
    diff_chain = {'type': 'export-diff', 'stream': file_spec(tmp_path / 'base'),
                  'diffs': [{'stream': file_spec(tmp_path / f'd{i}')}
                            for i in range(many)]}
    caught = bounded_probe(diff_chain, ctx_for(tmp_path))
    assert isinstance(caught, InvalidArgument)
    assert str(caught).startswith('source-spec: diffs: the export-diff chain')
