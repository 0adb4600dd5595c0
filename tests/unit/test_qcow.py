"""QcowFormat against QEMU: every byte read must equal ``qemu-img convert``.

Images are made with qemu-img/qemu-io in a temporary directory: small virtual
sizes, data at scattered offsets, both random (stored as is even when
compressing) and compressible (stored compressed).
"""
import concurrent.futures
import random
import struct
import subprocess
from pathlib import Path
from typing import (Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple)

import pytest
from hypothesis import given, settings, strategies as st

from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument, PermissionDenied, Unsupported
from rbd_migration.formats import open_format, qcow_cache
from rbd_migration.formats.base import ExtentKind, Format, Snapshot
from rbd_migration.formats.detect import sniff
from rbd_migration.formats.qcow import QcowFormat
from rbd_migration.formats.raw import RawFormat
from rbd_migration.limits import SourceLimits
from tests.profile import examples

KiB, MiB = 1 << 10, 1 << 20
SIZE = 6 * MiB + 1536          # not a multiple of any cluster size above 512
CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]


# -- making images ------------------------------------------------------------


def run(*args: str, cwd: Optional[Path] = None, flake: str = '') -> None:
    """``args`` run to success; up to five times while their output says
    ``flake``."""
    for _ in range(5 if flake else 1):
        proc = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if not flake or flake not in proc.stdout:
            break
    assert proc.returncode == 0, f'{" ".join(args)}: {proc.stdout}'


def qemu_io(img: Path, *commands: str, fmt: str = 'qcow2') -> None:
    args = ['qemu-io', '-f', fmt]
    for command in commands:
        args += ['-c', command]
    # QEMU opens a relative external data file name from its working
    # directory; the image's directory makes that the same file we read.
    run(*args, str(img), cwd=img.parent)


def scattered_raw(path: Path, size: int = SIZE, seed: int = 1,
                  regions: int = 24) -> Path:
    """A sparse raw disk: random and compressible runs at random offsets,
    zeros elsewhere."""
    rng = random.Random(seed)
    letters = bytes(b'ACGT'[i % 4] for i in range(256))
    buf = bytearray(size)
    for i in range(regions):
        length = rng.choice([512, 3000, 4096, 70000, 300000])
        offset = rng.randrange(0, size - length)
        data = rng.randbytes(length)
        if i % 2:
            data = data.translate(letters)     # compresses about 4:1
        buf[offset:offset + length] = data
    path.write_bytes(bytes(buf))
    return path


def convert(src: Path, dst: Path, opts: str = '', compress: bool = False,
            src_fmt: str = 'raw', dst_fmt: str = 'qcow2') -> Path:
    args = ['qemu-img', 'convert', '-f', src_fmt, '-O', dst_fmt]
    if opts:
        args += ['-o', opts]
    if compress:
        args.append('-c')
    run(*args, str(src), str(dst))
    return dst


def reference(img: Path, snapshot: Optional[str] = None) -> bytes:
    """The disk as QEMU reads it."""
    out = img.with_name(img.name + f'.{snapshot or "head"}.raw')
    args = ['qemu-img', 'convert', '-O', 'raw']
    if snapshot:
        args += ['-l', f'snapshot.name={snapshot}']
    run(*args, str(img), str(out), cwd=img.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def ctx_for(*paths: Path) -> SourceContext:
    return SourceContext(allowed_file_roots=[str(p) for p in paths])


def open_qcow(img: Path, backing: Optional[Format] = None) -> QcowFormat:
    fmt = QcowFormat.from_spec(
        {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(img)}},
        ctx_for(img.parent))
    fmt.backing = backing
    return fmt


def open_raw(img: Path) -> RawFormat:
    return RawFormat.from_spec(
        {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(img)}},
        ctx_for(img.parent))


# -- checking -----------------------------------------------------------------


def read_checked(fmt: Format, offset: int, length: int,
                 snap: Optional[Snapshot] = None) -> bytes:
    """``read``, and ``read_into`` (how the copier reads) agreeing with it
    over a buffer that held other bytes."""
    data = fmt.read(offset, length, snap)
    buf = bytearray(b'\xa5' * length)
    fmt.read_into(offset, memoryview(buf), snap)
    assert buf == data
    return data


def check_reads(fmt: Format, ref: bytes, snap: Optional[Snapshot] = None,
                cluster: int = 4096) -> None:
    """Whole-disk read, reads that straddle cluster boundaries, and reads
    past the end, all against QEMU's bytes.  QEMU reads a snapshot at the
    current (maybe larger) size, with zeros past the snapshot's end."""
    size = fmt.size(snap)
    assert len(ref) >= size and not any(ref[size:])
    ref = ref[:size]
    assert read_checked(fmt, 0, size, snap) == ref
    step = 12345
    for offset in range(0, size, step * 7):
        assert read_checked(fmt, offset, step, snap) == ref[offset:offset + step]
    for boundary in range(cluster, size, max(cluster, size // 40)):
        offset = boundary - 7
        assert read_checked(fmt, offset, 14, snap) == ref[offset:offset + 14]
    assert read_checked(fmt, size - 100, 300, snap) == ref[-100:] + bytes(200)
    assert read_checked(fmt, size + 5, 10, snap) == bytes(10)
    assert read_checked(fmt, 17, 0, snap) == b''


def check_extents(fmt: Format, ref: bytes, snap: Optional[Snapshot] = None,
                  sparse: bool = True) -> List:
    """Sorted, disjoint, inside the disk, merged; zeros wherever they say
    so or say nothing."""
    size = fmt.size(snap)
    extents = list(fmt.extents(snap))
    pos = 0
    prev = None
    for ext in extents:
        assert ext.length > 0
        assert ext.offset >= pos, 'extents overlap or are out of order'
        assert ext.end <= size
        if prev is not None and prev.end == ext.offset:
            assert prev.kind != ext.kind, 'adjacent extents not merged'
        assert not any(ref[pos:ext.offset]), \
            f'data in gap {pos:#x}..{ext.offset:#x}'
        if ext.kind == ExtentKind.ZERO:
            assert not any(ref[ext.offset:ext.end]), f'non-zero {ext}'
        pos, prev = ext.end, ext
    assert not any(ref[pos:size])
    if sparse:
        assert sum(e.length for e in extents) < size, 'nothing left sparse'
    return extents


def check_image(fmt: Format, img: Path, cluster: int = 4096,
                sparse: bool = True) -> None:
    ref = reference(img)
    check_reads(fmt, ref, None, cluster)
    check_extents(fmt, ref, None, sparse)
    for snap in fmt.snapshots():
        ref = reference(img, snap.name)
        check_reads(fmt, ref, snap, cluster)
        check_extents(fmt, ref, snap, sparse)


def kinds(fmt: Format, snap: Optional[Snapshot] = None) -> set:
    return {e.kind for e in fmt.extents(snap)}


# -- qcow2: plain, zero clusters, cluster sizes -------------------------------


@pytest.mark.parametrize('cluster', CLUSTER_SIZES)
@pytest.mark.parametrize('compat', ['0.10', '1.1'])
def test_qcow2_matches_qemu(tmp_path: Path, cluster: int, compat: str) -> None:
    raw = scattered_raw(tmp_path / 'disk.raw', seed=cluster)
    img = convert(raw, tmp_path / 'disk.qcow2',
                  f'cluster_size={cluster},compat={compat}')
    zero_at = -(-MiB // cluster) * cluster
    zero_len = max(cluster, 128 * KiB)
    qemu_io(img, f'write -P 0x5a {zero_at} {zero_len}',
            f'write -z {zero_at} {zero_len}',
            f'write -P 0xa5 {5 * MiB + 512} 3072',
            f'write -P 0x11 {SIZE - 1024} 1024')
    with open_qcow(img) as fmt:
        assert fmt.size() == SIZE
        assert fmt.snapshots() == []
        assert not fmt.features.compressed
        assert fmt.features.compression_type == 'zlib'
        # 2 MiB clusters: the scattered data touches every one of them.
        check_image(fmt, img, cluster, sparse=cluster < 2 * MiB)
        if compat == '1.1':
            assert ExtentKind.ZERO in kinds(fmt)


def test_qcow2_empty_image_has_no_extents(tmp_path: Path) -> None:
    img = tmp_path / 'empty.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', str(img), '3M')
    with open_qcow(img) as fmt:
        assert list(fmt.extents()) == []
        assert fmt.read(MiB - 3, 10) == bytes(10)


# -- compression --------------------------------------------------------------


@pytest.mark.parametrize('cluster', [512, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize('ctype', ['zlib', 'zstd'])
def test_compressed_matches_qemu(tmp_path: Path, cluster: int,
                                 ctype: str) -> None:
    raw = scattered_raw(tmp_path / 'disk.raw', seed=7)
    img = convert(raw, tmp_path / 'disk.qcow2',
                  f'cluster_size={cluster},compression_type={ctype}',
                  compress=True)
    # A partial write into compressed clusters makes QEMU decompress them
    # into normal clusters: the image mixes both.
    qemu_io(img, 'write -P 0x77 1536 1024')
    with open_qcow(img) as fmt:
        assert fmt.features.compressed
        assert fmt.features.compression_type == ctype
        assert kinds(fmt) == {ExtentKind.DATA}
        check_image(fmt, img, cluster)


def test_compressed_only_in_snapshot_is_reported(tmp_path: Path) -> None:
    raw = scattered_raw(tmp_path / 'disk.raw', size=2 * MiB, seed=3)
    img = convert(raw, tmp_path / 'disk.qcow2', 'cluster_size=64k',
                  compress=True)
    run('qemu-img', 'snapshot', '-c', 'old', str(img))
    qemu_io(img, f'write -P 0x42 0 {2 * MiB}')   # HEAD: nothing compressed
    with open_qcow(img) as fmt:
        assert fmt.features.compressed
        check_image(fmt, img, 64 * KiB, sparse=False)


def test_uncompressed_with_snapshot_is_not_compressed(tmp_path: Path) -> None:
    img = convert(scattered_raw(tmp_path / 'disk.raw', size=2 * MiB),
                  tmp_path / 'disk.qcow2')
    run('qemu-img', 'snapshot', '-c', 'old', str(img))
    with open_qcow(img) as fmt:
        assert not fmt.features.compressed


def test_corrupt_compressed_cluster_is_reported(tmp_path: Path) -> None:
    img = convert(scattered_raw(tmp_path / 'disk.raw', size=MiB, seed=5),
                  tmp_path / 'disk.qcow2', 'cluster_size=64k', compress=True)
    with open_qcow(img) as fmt:
        run_ = next(r for r in fmt._runs(fmt._l1, 0, MiB)
                    if r.kind == 'compressed')
        host = run_.host
        offset = run_.offset
    with open(img, 'r+b') as f:
        f.seek(host)
        f.write(b'\xff' * 64)
    with open_qcow(img) as fmt, pytest.raises(InvalidArgument) as exc:
        fmt.read(offset, 10)
    assert 'compressed cluster' in str(exc.value)
    assert 'qemu-img check' in str(exc.value)


# -- extended L2 --------------------------------------------------------------


SUBCLUSTER_WRITES = [
    'write -P 0x31 0 2k',            # one subcluster of a fresh cluster
    'write -P 0x32 70k 10k',         # across subclusters
    'write -z 200k 8k',              # zero subclusters, cluster unallocated
    'write -P 0x33 1M 64k',          # a whole 64k cluster
    'write -z 1028k 4k',             # zero subclusters in an allocated one
    'write -P 0x34 3070k 4k',        # across a 64k cluster boundary
]


@pytest.mark.parametrize('cluster', [64 * KiB, 2 * MiB])
def test_extended_l2_matches_qemu(tmp_path: Path, cluster: int) -> None:
    img = tmp_path / 'ext.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', '-o',
        f'extended_l2=on,cluster_size={cluster}', str(img), str(SIZE))
    qemu_io(img, *SUBCLUSTER_WRITES)
    with open_qcow(img) as fmt:
        assert fmt.features.extended_l2
        assert ExtentKind.ZERO in kinds(fmt)
        check_image(fmt, img, cluster // 32)


def test_extended_l2_compressed(tmp_path: Path) -> None:
    raw = scattered_raw(tmp_path / 'disk.raw', seed=11)
    img = convert(raw, tmp_path / 'disk.qcow2',
                  'extended_l2=on,cluster_size=32k', compress=True)
    qemu_io(img, 'write -P 0x61 4k 2k', 'write -z 1M 4k')
    with open_qcow(img) as fmt:
        assert fmt.features.compressed and fmt.features.extended_l2
        check_image(fmt, img, 1024)


# -- internal snapshots -------------------------------------------------------


@pytest.mark.parametrize('compat', ['0.10', '1.1'])
@pytest.mark.parametrize('cluster', [4 * KiB, 64 * KiB])
def test_snapshots_match_qemu(tmp_path: Path, compat: str,
                              cluster: int) -> None:
    img = convert(scattered_raw(tmp_path / 'disk.raw', size=4 * MiB),
                  tmp_path / 'disk.qcow2',
                  f'compat={compat},cluster_size={cluster}')
    run('qemu-img', 'snapshot', '-c', 's1', str(img))
    qemu_io(img, 'write -P 0x11 0 8k', f'write -z {MiB} {2 * cluster}',
            'write -P 0x12 2000k 3k')
    run('qemu-img', 'snapshot', '-c', 's2', str(img))
    grow = compat == '1.1'        # QEMU resizes only v3 images with snapshots
    if grow:
        run('qemu-img', 'resize', str(img), '+1M')
        qemu_io(img, f'write -P 0x13 {4 * MiB + 512} 4k')
    qemu_io(img, 'write -P 0x14 3k 2k')
    with open_qcow(img) as fmt:
        snaps = fmt.snapshots()
        assert [s.name for s in snaps] == ['s1', 's2']
        assert [s.ident for s in snaps] == ['1', '2']
        assert all(s.size == 4 * MiB for s in snaps)
        assert fmt.size() == (5 if grow else 4) * MiB
        check_image(fmt, img, cluster)
        a, b = (fmt.read(0, 8 * KiB, s) for s in snaps)
        assert a != b


def test_unknown_snapshot_is_refused(tmp_path: Path) -> None:
    img = tmp_path / 'x.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', str(img), '1M')
    with open_qcow(img) as fmt, pytest.raises(InvalidArgument) as exc:
        fmt.read(0, 1, Snapshot('nope', MiB, ident='9'))
    assert "'nope'" in str(exc.value)


# -- qcow version 1 -----------------------------------------------------------


def test_qcow_v1_matches_qemu(tmp_path: Path) -> None:
    img = convert(scattered_raw(tmp_path / 'disk.raw', seed=21),
                  tmp_path / 'disk.qcow', dst_fmt='qcow')
    # qcow v1 compresses one whole cluster per write.
    qemu_io(img, 'write -c -P 0x44 256k 4k', 'write -c -P 0x45 1M 4k',
            'write -c -P 0x46 1028k 4k', 'write -P 0x47 2049k 1k',
            fmt='qcow')
    with open_qcow(img) as fmt:
        assert fmt.header.version == 1
        assert fmt.features.compressed
        assert 'qcow version 1' in fmt.features.notes
        check_image(fmt, img)


def test_qcow_v1_uncompressed(tmp_path: Path) -> None:
    img = tmp_path / 'v1.qcow'
    run('qemu-img', 'create', '-f', 'qcow', str(img), '3M')
    qemu_io(img, 'write -P 0x12 4k 8k', fmt='qcow')
    with open_qcow(img) as fmt:
        assert not fmt.features.compressed
        check_image(fmt, img)


# -- backing files ------------------------------------------------------------


def make_chain(tmp_path: Path, overlay_opts: str = '',
               base_fmt: str = 'qcow2') -> Path:
    """base (4 MiB, data everywhere-ish) <- overlay (6 MiB, some writes)."""
    raw = scattered_raw(tmp_path / 'base.raw', size=4 * MiB, seed=31,
                        regions=40)
    if base_fmt == 'raw':
        base = raw
    else:
        base = convert(raw, tmp_path / f'base.{base_fmt}',
                       'cluster_size=64k' if base_fmt == 'qcow2' else '',
                       dst_fmt=base_fmt)
    overlay = tmp_path / 'overlay.img'
    args = ['qemu-img', 'create', '-f', 'qcow2', '-b', base.name, '-F',
            base_fmt]
    if overlay_opts:
        args += ['-o', overlay_opts]
    run(*args, str(overlay), str(SIZE), cwd=tmp_path)
    qemu_io(overlay, 'write -P 0x51 4k 2k', 'write -P 0x52 1000k 100k',
            'write -z 2M 128k', 'write -P 0x53 4090k 12k',
            f'write -P 0x54 {5 * MiB} 4k')
    return overlay


def open_base(tmp_path: Path, base_fmt: str) -> Format:
    base = tmp_path / f'base.{base_fmt}'
    return open_raw(base) if base_fmt == 'raw' else open_qcow(base)


@pytest.mark.parametrize('overlay_opts,base_fmt', [
    ('cluster_size=4k', 'qcow2'),
    ('cluster_size=64k,compat=0.10', 'qcow2'),
    ('cluster_size=64k,extended_l2=on', 'qcow2'),
    ('cluster_size=32k,extended_l2=on', 'raw'),
    ('', 'qcow'),
])
def test_backing_chain_matches_qemu(tmp_path: Path, overlay_opts: str,
                                    base_fmt: str) -> None:
    overlay = make_chain(tmp_path, overlay_opts, base_fmt)
    base = open_base(tmp_path, base_fmt)
    with open_qcow(overlay, backing=base) as fmt:
        assert fmt.features.backing_file == f'base.{base_fmt}'
        assert fmt.backing_format == base_fmt
        check_image(fmt, overlay, 4096, sparse=base_fmt != 'raw')


def test_backing_snapshot_reads_through(tmp_path: Path) -> None:
    overlay = make_chain(tmp_path, 'cluster_size=4k')
    run('qemu-img', 'snapshot', '-c', 'snap', str(overlay))
    qemu_io(overlay, 'write -P 0x66 0 1M')
    with open_qcow(overlay, backing=open_base(tmp_path, 'qcow2')) as fmt:
        check_image(fmt, overlay)


def test_backing_not_attached(tmp_path: Path) -> None:
    overlay = make_chain(tmp_path, 'cluster_size=4k')
    ref = reference(overlay)
    with open_qcow(overlay) as fmt:
        assert fmt.backing_file == 'base.qcow2'
        extents = list(fmt.extents())
        assert extents == list(fmt.own_extents())
        for ext in extents:
            assert fmt.read(ext.offset, ext.length) == ref[ext.offset:ext.end]
        with pytest.raises(Unsupported) as exc:
            fmt.read(0, MiB)
        assert "'base.qcow2'" in str(exc.value)


# -- external data file, encryption -------------------------------------------


def test_external_data_file(tmp_path: Path) -> None:
    img = tmp_path / 'ext.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', '-o', 'data_file=ext.data',
        str(img), '4M', cwd=tmp_path)
    qemu_io(img, 'write -P 0x71 0 64k', 'write -P 0x72 1M 3k',
            'write -z 2M 64k')
    with open_qcow(img) as fmt:
        assert fmt.features.external_data_file == 'ext.data'
        check_image(fmt, img)


def test_external_data_file_outside_roots(tmp_path: Path) -> None:
    (tmp_path / 'images').mkdir()
    img = tmp_path / 'images' / 'ext.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', '-o', 'data_file=../ext.data',
        str(img), '1M', cwd=tmp_path / 'images')
    qemu_io(img, 'write -P 0x71 0 64k')
    with open_qcow(img) as fmt:
        assert fmt.read(MiB - 10, 10) == bytes(10)   # needs no data file
        with pytest.raises(PermissionDenied) as exc:
            fmt.read(0, 10)
    assert 'not under an allowed directory' in str(exc.value)
    assert "'../ext.data'" in str(exc.value)


@pytest.mark.parametrize('fmt_name,opts,method', [
    ('qcow2', 'encrypt.format=luks,encrypt.key-secret=sec0,'
              'encrypt.iter-time=10', 'luks'),
    ('qcow', 'encrypt.format=aes,encrypt.key-secret=sec0', 'aes'),
])
def test_encrypted_opens_but_does_not_read(tmp_path: Path, fmt_name: str,
                                           opts: str, method: str) -> None:
    img = tmp_path / 'enc.img'
    # QEMU times a PBKDF2 run to pick LUKS's iteration count, and gives up
    # when the thread's CPU clock did not tick meanwhile.
    run('qemu-img', 'create', '--object', 'secret,id=sec0,data=123456',
        '-f', fmt_name, '-o', opts, str(img), '1M',
        flake='Unable to get accurate CPU usage')
    with open_qcow(img) as fmt:
        assert fmt.features.encrypted
        assert f'encrypted with {method}' in fmt.features.notes
        with pytest.raises(Unsupported) as exc:
            fmt.read(0, 512)
        assert 'encrypted' in str(exc.value)


# -- malformed images ---------------------------------------------------------


def patched(tmp_path: Path, offset: int, value: bytes,
            opts: str = 'compat=1.1') -> Path:
    img = tmp_path / 'bad.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', '-o', opts, str(img), '1M')
    with open(img, 'r+b') as f:
        f.seek(offset)
        f.write(value)
    return img


def test_raw_file_as_qcow_is_refused(tmp_path: Path) -> None:
    img = scattered_raw(tmp_path / 'disk.raw', size=MiB)
    with pytest.raises(InvalidArgument) as exc:
        open_qcow(img)
    message = str(exc.value)
    assert 'type' in message and "'raw'" in message
    assert '\n' not in message


@pytest.mark.parametrize('offset,value,error,words', [
    (4, struct.pack('>I', 4), Unsupported, 'version 4'),
    (20, struct.pack('>I', 22), InvalidArgument, 'cluster_bits 22'),
    (20, struct.pack('>I', 8), InvalidArgument, 'cluster_bits 8'),
    (40, struct.pack('>Q', 1 << 40), InvalidArgument, 'L1 table'),
    (36, struct.pack('>I', 0), InvalidArgument, 'L1 table has 0 entries'),
    (72, struct.pack('>Q', 1 << 1), InvalidArgument, 'qemu-img check -r all'),
    (72, struct.pack('>Q', 1 << 9), Unsupported, 'bit 9'),
    (32, struct.pack('>I', 7), InvalidArgument, 'crypt_method'),
    (100, struct.pack('>I', 100), InvalidArgument, 'header_length'),
])
def test_malformed_header(tmp_path: Path, offset: int, value: bytes,
                          error: type, words: str) -> None:
    img = patched(tmp_path, offset, value)
    with pytest.raises(error) as exc:
        open_qcow(img)
    assert words in str(exc.value)
    assert 'source-spec' in str(exc.value)


def test_truncated_image(tmp_path: Path) -> None:
    img = tmp_path / 'short.qcow2'
    img.write_bytes(b'QFI\xfb\0\0\0\3' + bytes(20))
    with pytest.raises(InvalidArgument) as exc:
        open_qcow(img)
    assert 'truncated' in str(exc.value)


def test_dirty_image_is_noted(tmp_path: Path) -> None:
    img = patched(tmp_path, 72, struct.pack('>Q', 1))
    with open_qcow(img) as fmt:
        assert any('dirty' in note for note in fmt.features.notes)


def test_registry_opens_qcow(tmp_path: Path) -> None:
    img = tmp_path / 'x.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', str(img), '1M')
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(img)}}
    with open_format(spec, ctx_for(tmp_path)) as fmt:
        assert isinstance(fmt, QcowFormat)


def test_sniff(tmp_path: Path) -> None:
    img = tmp_path / 'x.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', str(img), '1M')
    assert sniff(img.read_bytes()[:4]) == 'qcow'
    assert sniff(b'\0' * 512) is None
    assert sniff(b'QF') is None


# -- concurrency and bounded caches -------------------------------------------


def test_concurrent_reads_with_tiny_caches(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """Evictions on every read, eight threads at once: still QEMU's bytes."""
    monkeypatch.setattr(qcow_cache, 'CLUSTER_CACHE_BYTES', 8 * KiB)
    img = convert(scattered_raw(tmp_path / 'disk.raw', seed=41),
                  tmp_path / 'disk.qcow2', 'cluster_size=4k', compress=True)
    qemu_io(img, 'write -P 0x21 0 1M')
    ref = reference(img)
    rng = random.Random(5)
    reads = [(rng.randrange(SIZE), rng.randrange(1, 200 * KiB))
             for _ in range(300)]
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(img)}}
    ctx = SourceContext(allowed_file_roots=[str(tmp_path)],
                        limits=SourceLimits(metadata_bytes=8 * KiB))
    with QcowFormat.from_spec(spec, ctx) as fmt:
        def check(arg: Sequence[int]) -> bool:
            offset, length = arg
            want = ref[offset:offset + length]
            return fmt.read(offset, length) == want + bytes(length - len(want))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(check, reads))
        budget = fmt._budget
        assert budget.pinned + budget.metadata._used <= 8 * KiB
        assert budget.clusters._used <= 8 * KiB


def test_lru_cache_stays_within_budget() -> None:
    cache = qcow_cache._LruCache(100)
    loads: List[int] = []

    def loader(key: int, weight: int) -> Callable[[], Tuple[int, int]]:
        def load() -> Tuple[int, int]:
            loads.append(key)
            return key, weight
        return load
    for key in range(10):
        assert cache.get(key, loader(key, 30)) == key
    assert cache._used <= 100 and len(cache._items) == 3
    assert cache.get(9, loader(9, 30)) == 9 and loads.count(9) == 1
    assert cache.get(0, loader(0, 30)) == 0 and loads.count(0) == 2
    assert cache.get('big', loader(99, 101)) == 99    # served, not kept
    assert 'big' not in cache._items


# -- random reads against QEMU ------------------------------------------------


@pytest.fixture(scope='module')
def rich_chain(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Tuple[QcowFormat, Dict[Optional[str], bytes]]]:
    """zstd-compressed v3 base <- extended-L2 overlay with a snapshot."""
    tmp = tmp_path_factory.mktemp('rich')
    raw = scattered_raw(tmp / 'base.raw', size=4 * MiB, seed=51, regions=40)
    convert(raw, tmp / 'base.qcow2', 'cluster_size=4k,compression_type=zstd',
            compress=True)
    overlay = tmp / 'overlay.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F',
        'qcow2', '-o', 'cluster_size=64k,extended_l2=on', str(overlay),
        str(SIZE), cwd=tmp)
    qemu_io(overlay, *SUBCLUSTER_WRITES)
    run('qemu-img', 'snapshot', '-c', 'snap', str(overlay))
    qemu_io(overlay, 'write -P 0x7e 60k 40k', 'write -z 3M 256k')
    fmt = open_qcow(overlay, backing=open_qcow(tmp / 'base.qcow2'))
    refs: Dict[Optional[str], bytes] = {
        None: reference(overlay), 'snap': reference(overlay, 'snap')}
    yield fmt, refs
    fmt.close()


RichChain = Tuple[QcowFormat, Dict[Optional[str], bytes]]


@settings(max_examples=300, deadline=None, database=None)
@given(offset=st.integers(0, SIZE + 64 * KiB),
       length=st.integers(0, 400 * KiB),
       use_snap=st.booleans())
def test_random_reads_match_qemu(rich_chain: RichChain, offset: int,
                                 length: int, use_snap: bool) -> None:
    fmt, refs = rich_chain
    snap = fmt.snapshots()[0] if use_snap else None
    ref = refs['snap' if use_snap else None][:fmt.size(snap)]
    want = ref[offset:offset + length]
    assert fmt.read(offset, length, snap) == want + bytes(length - len(want))


@settings(max_examples=examples(quick=120, thorough=1500), deadline=None, database=None)
@given(spans=st.lists(st.tuples(st.integers(0, SIZE + 64 * KiB), st.integers(0, 300 * KiB)),
                      min_size=1, max_size=6),
       gap=st.sampled_from([-1, 0, 512, 64 * KiB]),
       limit=st.sampled_from([4 * KiB, 64 * KiB, 4 * MiB]),
       use_snap=st.booleans())
def test_merged_reads_match_qemu(rich_chain: RichChain, spans: List[Tuple[int, int]],
                                 gap: int, limit: int, use_snap: bool) -> None:
    """Pieces read together, their clusters merged into few requests of each
    layer's stream (with and without gaps, within any limit), hold what
    QEMU reads."""
    fmt, refs = rich_chain
    snap = fmt.snapshots()[0] if use_snap else None
    ref = refs['snap' if use_snap else None][:fmt.size(snap)]
    streams = [fmt._stream, fmt.backing._stream]  # type: ignore[union-attr]
    for stream in streams:
        stream.merge_gap, stream.merge_limit = gap, limit
    try:
        views = [memoryview(bytearray(length)) for _, length in spans]
        fmt.read_pieces([(offset, view) for (offset, _), view in zip(spans, views)], snap)
    finally:
        for stream in streams:
            del stream.merge_gap, stream.merge_limit
    for (offset, length), view in zip(spans, views):
        want = ref[offset:offset + length]
        assert bytes(view) == want + bytes(length - len(want))


def test_rich_chain_extents(rich_chain: RichChain) -> None:
    fmt, refs = rich_chain
    check_extents(fmt, refs[None], None)
    check_extents(fmt, refs['snap'], fmt.snapshots()[0])
    assert fmt.features.compressed is False        # overlay only
    assert fmt.backing is not None
    assert fmt.backing.features.compressed is True


def test_snapshot_tables_librbd_would_load_send_the_import_to_the_adapter(
        tmp_path: Path) -> None:
    """librbd's reader loads every snapshot's L1 table whenever the mgr
    opens the target (each status, execute and abort); past the metadata
    bound the probe picks the module's reader, which keeps within it."""
    from rbd_migration.probe import ADAPTER, probe
    img = tmp_path / 'many.qcow2'
    # 4 KiB clusters: an L2 table covers 2 MiB, so 64 GiB need 256 KiB of L1.
    run('qemu-img', 'create', '-f', 'qcow2', '-o', 'cluster_size=4096', str(img), '64G')
    for name in ('s1', 's2'):
        run('qemu-img', 'snapshot', '-c', name, str(img))
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(img)}}
    tight = SourceContext(allowed_file_roots=[str(tmp_path)],
                          limits=SourceLimits(metadata_bytes=600 * KiB))
    report = probe(spec, tight)
    assert report.path == ADAPTER
    assert report.features['open_tables'] == 3 * 256 * KiB
    assert any('MiB of L1 tables' in r and 'librbd would load' in r for r in report.reasons)
    # librbd holds them several times over while it opens the image: it gets
    # tables within a quarter of the bound only.
    quarter = SourceContext(allowed_file_roots=[str(tmp_path)],
                            limits=SourceLimits(metadata_bytes=3 * MiB))
    assert [r for r in probe(spec, quarter).reasons if 'L1 tables' in r] == []
    half = SourceContext(allowed_file_roots=[str(tmp_path)],
                         limits=SourceLimits(metadata_bytes=3 * MiB // 2))
    assert probe(spec, half).path == ADAPTER
    roomy = SourceContext(allowed_file_roots=[str(tmp_path)])
    assert not [r for r in probe(spec, roomy).reasons if 'L1 tables' in r]


def test_only_clusters_read_in_part_stay_decompressed(tmp_path: Path) -> None:
    """A copy reads whole clusters: keeping them decompressed would hold up
    to 16 MiB per running task for nothing.  A cluster read in part is kept
    for the read of its other part."""
    raw = tmp_path / 'letters.raw'
    raw.write_bytes(bytes(b'ACGT'[i % 4] for i in range(1 * MiB)))
    img = convert(raw, tmp_path / 'z.qcow2', 'cluster_size=65536', compress=True)
    expected = raw.read_bytes()
    fmt = open_qcow(img)
    try:
        assert fmt.features.compressed
        clusters = fmt._budget.clusters
        assert fmt.read(0, 512 * KiB) == expected[:512 * KiB]
        assert clusters._used == 0
        assert fmt.read(512 * KiB + 100, 1000) == expected[512 * KiB + 100:512 * KiB + 1100]
        assert clusters._used == 64 * KiB
        view = memoryview(bytearray(64 * KiB))
        fmt.read_into(512 * KiB, view)
        assert bytes(view) == expected[512 * KiB:576 * KiB]
        assert clusters._used == 64 * KiB
    finally:
        fmt.close()


def test_many_snapshots_send_the_import_to_the_adapter(tmp_path: Path) -> None:
    """librbd's import holds memory in the mgr per snapshot at each open:
    past LIBRBD_MAX_SNAPSHOTS the module's reader imports the source."""
    from rbd_migration.probe import ADAPTER, LIBRBD_MAX_SNAPSHOTS, probe
    img = tmp_path / 'snaps.qcow2'
    run('qemu-img', 'create', '-f', 'qcow2', str(img), '1M')
    for i in range(LIBRBD_MAX_SNAPSHOTS):
        run('qemu-img', 'snapshot', '-c', f's{i}', str(img))
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(img)}}
    # A file source takes the adapter anyway; the reason is what is tested.
    report = probe(spec, ctx_for(tmp_path))
    assert len(report.snapshots) == LIBRBD_MAX_SNAPSHOTS
    assert not [r for r in report.reasons if 'snapshots, and librbd' in r]
    run('qemu-img', 'snapshot', '-c', 'one-more', str(img))
    report = probe(spec, ctx_for(tmp_path))
    assert report.path == ADAPTER
    assert [r for r in report.reasons
            if f'has {LIBRBD_MAX_SNAPSHOTS + 1} snapshots, and librbd' in r]
