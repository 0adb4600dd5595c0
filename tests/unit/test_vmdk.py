"""VmdkFormat against QEMU: every byte read must equal ``qemu-img convert``.

Disks are made with qemu-img from a sparse raw image holding random and
compressible runs at scattered offsets, in each subformat VMware and QEMU
write; refusals are checked to be one line naming the fix.
"""
import random
import struct
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument, MigrationError, Unsupported
from rbd_migration.formats import open_format
from rbd_migration.formats.base import ExtentKind, Format
from rbd_migration.formats.vmdk import VmdkFormat
from rbd_migration.probe import ADAPTER, probe
from rbd_migration.streams.file import FileStream
from tests.profile import examples

KiB, MiB = 1 << 10, 1 << 20
SIZE = 7 * MiB + 4096
SUBFORMATS = ['monolithicSparse', 'streamOptimized', 'monolithicFlat',
              'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']


def run(*args: str) -> None:
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f'{" ".join(args)}: {proc.stdout}'


def scattered_raw(path: Path, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    buf = bytearray(SIZE)
    for i in range(30):
        length = rng.choice([512, 3000, 65536, 200000])
        offset = rng.randrange(0, SIZE - length)
        data = rng.randbytes(length)
        if i % 2:
            data = data.translate(bytes(b'ACGT'[j % 4] for j in range(256)))
        buf[offset:offset + length] = data
    path.write_bytes(bytes(buf))
    return bytes(buf)


def make_vmdk(tmp_path: Path, subformat: str) -> Tuple[Path, bytes]:
    data = scattered_raw(tmp_path / 'disk.raw')
    img = tmp_path / 'disk.vmdk'
    run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o', f'subformat={subformat}',
        str(tmp_path / 'disk.raw'), str(img))
    out = tmp_path / 'qemu.raw'
    run('qemu-img', 'convert', '-O', 'raw', str(img), str(out))
    assert out.read_bytes() == data
    return img, data


def open_vmdk(img: Path) -> Format:
    return open_format({'type': 'vmdk', 'stream': {'type': 'file', 'file_path': str(img)}},
                       SourceContext(allowed_file_roots=[str(img.parent)]))


@pytest.mark.parametrize('subformat', SUBFORMATS)
def test_every_subformat_matches_qemu(tmp_path: Path, subformat: str) -> None:
    img, data = make_vmdk(tmp_path, subformat)
    with open_vmdk(img) as fmt:
        assert isinstance(fmt, VmdkFormat)
        assert fmt.size() == SIZE and fmt.snapshots() == []
        assert fmt.read(0, SIZE + 100) == data + bytes(100)
        buf = bytearray(3 * MiB + 17)
        got = bytearray()
        for offset in range(0, SIZE, len(buf)):
            fmt.read_into(offset, memoryview(buf))
            got += buf
        assert bytes(got[:SIZE]) == data
        # Extents name every byte that is not zero, sparse where the file is.
        covered = bytearray(SIZE)
        for ext in fmt.extents():
            if ext.kind is ExtentKind.DATA:
                covered[ext.offset:ext.end] = data[ext.offset:ext.end]
        assert bytes(covered) == data
        if 'Sparse' in subformat or subformat == 'streamOptimized':
            assert sum(e.length for e in fmt.extents()) < SIZE // 2
        assert fmt.features.compressed == (subformat == 'streamOptimized')


@settings(max_examples=examples(quick=60, thorough=600), deadline=None, database=None)
@given(spans=st.lists(st.tuples(st.integers(0, SIZE + 4096), st.integers(0, 200 * KiB)),
                      min_size=1, max_size=5),
       subformat=st.sampled_from(SUBFORMATS))
def test_pieces_read_together_match_qemu(tmp_path_factory: pytest.TempPathFactory,
                                         spans: List[Tuple[int, int]], subformat: str) -> None:
    tmp = tmp_path_factory.getbasetemp() / f'pieces-{subformat}'
    if not tmp.exists():
        tmp.mkdir()
        make_vmdk(tmp, subformat)
    data = (tmp / 'disk.raw').read_bytes()
    with open_vmdk(tmp / 'disk.vmdk') as fmt:
        views = [memoryview(bytearray(n)) for _, n in spans]
        fmt.read_pieces([(o, v) for (o, _), v in zip(spans, views)])
    for (offset, length), view in zip(spans, views):
        want = data[offset:offset + length]
        assert bytes(view) == want + bytes(length - len(want))


def test_probe_sends_vmdk_to_the_adapter(tmp_path: Path) -> None:
    img, _ = make_vmdk(tmp_path, 'streamOptimized')
    report = probe({'type': 'vmdk', 'stream': {'type': 'file', 'file_path': str(img)}},
                   SourceContext(allowed_file_roots=[str(tmp_path)]))
    assert report.path == ADAPTER and report.size == SIZE
    assert any("no reader for type 'vmdk'" in r for r in report.reasons)


def _refusal(img: Path, kind: type = MigrationError) -> str:
    with pytest.raises(MigrationError) as caught:
        open_vmdk(img).close()
    assert isinstance(caught.value, kind)
    message = str(caught.value)
    assert '\n' not in message
    return message


def test_a_delta_disk_is_refused(tmp_path: Path) -> None:
    make_vmdk(tmp_path, 'monolithicSparse')
    child = tmp_path / 'child.vmdk'
    run('qemu-img', 'create', '-f', 'vmdk', '-b', 'disk.vmdk', '-F', 'vmdk', str(child))
    assert 'delta disk' in _refusal(child, Unsupported)


def test_cowd_is_refused(tmp_path: Path) -> None:
    img = tmp_path / 'esx.vmdk'
    img.write_bytes(struct.pack('<I', 0x44574F43) + bytes(4092))
    assert 'vmfsSparse (COWD)' in _refusal(img, Unsupported)


def test_extent_outside_the_folder_is_refused(tmp_path: Path) -> None:
    img, _ = make_vmdk(tmp_path, 'monolithicFlat')
    text = img.read_text().replace('"disk-flat.vmdk"', '"../disk-flat.vmdk"')
    img.write_text(text)
    assert 'not a plain file name' in _refusal(img, InvalidArgument)


def test_corrupt_grain_is_reported(tmp_path: Path) -> None:
    img, _ = make_vmdk(tmp_path, 'streamOptimized')
    with open_vmdk(img) as fmt:
        first = next(e for e in fmt.extents() if e.kind is ExtentKind.DATA)
    raw = bytearray(img.read_bytes())
    # Overwrite every grain's deflate stream after its 12-byte marker.
    with open_vmdk(img) as fmt:
        assert isinstance(fmt, VmdkFormat)
        sparse = fmt._parts[0].sparse
        assert sparse is not None
        entry = next(e for _, _, e in sparse.grains(first.offset, first.offset + 1))
    raw[entry * 512 + 12:entry * 512 + 40] = b'\xff' * 28
    img.write_bytes(bytes(raw))
    with open_vmdk(img) as fmt:
        with pytest.raises(InvalidArgument) as caught:
            fmt.read(first.offset, 4096)
    assert 'the vmdk is corrupt' in str(caught.value) and 'does not inflate' in str(caught.value)


def test_not_a_vmdk(tmp_path: Path) -> None:
    img = tmp_path / 'x.vmdk'
    img.write_bytes(b'\x01' * 4096)
    assert 'not a vmdk' in _refusal(img, InvalidArgument)


# -- OVA ----------------------------------------------------------------------


def make_ova(tmp_path: Path, disks: List[str], gnu: bool = False) -> Path:
    """An OVA as VMware exports it: the OVF first, then streamOptimized disks."""
    (tmp_path / 'vm.ovf').write_text('<?xml version="1.0"?><Envelope/>')
    for i, name in enumerate(disks):
        raw = tmp_path / f'{name}.raw'
        raw.write_bytes(bytes([i + 1]) * (1 * MiB) + bytes(MiB))
        run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o',
            'subformat=streamOptimized', str(raw), str(tmp_path / name))
    ova = tmp_path / 'vm.ova'
    fmt = ['--format=gnu'] if gnu else ['--format=ustar']
    run('tar', '-C', str(tmp_path), *fmt, '-cf', str(ova), 'vm.ovf', *disks)
    return ova


def open_ova(ova: Path, **extra: object) -> Format:
    return open_format({'type': 'ova', 'stream': {'type': 'file', 'file_path': str(ova)},
                        **extra}, SourceContext(allowed_file_roots=[str(ova.parent)]))


def test_ova_disk_read_in_place(tmp_path: Path) -> None:
    ova = make_ova(tmp_path, ['disk1.vmdk'])
    with open_ova(ova) as fmt:
        assert fmt.size() == 2 * MiB
        assert fmt.read(0, 2 * MiB) == b'\x01' * MiB + bytes(MiB)
        assert fmt.features.compressed
        assert [e.kind for e in fmt.extents()] == [ExtentKind.DATA]


def test_ova_read_size_is_its_archives(tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk inside an archive read from S3 is worth S3's request size:
    the copier then reads it in groups of chunks."""
    ova = make_ova(tmp_path, ['disk1.vmdk'])
    with open_ova(ova) as fmt:
        assert fmt.read_size == 0
    monkeypatch.setattr(FileStream, 'request_size', 8 * MiB)
    with open_ova(ova) as fmt:
        assert fmt.read_size == 8 * MiB


def test_ova_with_several_disks_needs_a_choice(tmp_path: Path) -> None:
    long_name = 'a-disk-with-a-name-longer-than-a-hundred-characters-' + 'x' * 60 + '.vmdk'
    ova = make_ova(tmp_path, ['disk1.vmdk', long_name], gnu=True)
    with pytest.raises(InvalidArgument) as caught:
        open_ova(ova)
    assert str(caught.value).startswith('source-spec: disk: ')
    assert 'holds 2 disks' in str(caught.value)
    with open_ova(ova, disk=1) as fmt:
        assert fmt.read(0, 16) == b'\x02' * 16
    with open_ova(ova, disk=long_name) as fmt:
        assert fmt.read(0, 16) == b'\x02' * 16
    with open_ova(ova, disk='disk1.vmdk') as fmt:
        assert fmt.read(0, 16) == b'\x01' * 16
    with pytest.raises(InvalidArgument) as caught:
        open_ova(ova, disk=2)
    assert 'give an index below 2' in str(caught.value)


def test_not_an_ova(tmp_path: Path) -> None:
    img, _ = make_vmdk(tmp_path, 'streamOptimized')
    with pytest.raises(InvalidArgument) as caught:
        open_ova(img)
    assert 'not an OVA' in str(caught.value) and '\n' not in str(caught.value)
