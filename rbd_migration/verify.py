"""Verify: prove a target holds what its source holds before commit.

The source is read through the same format adapters imports use (an
in-cluster source in the trash by its id), the target through python3-rbd,
HEAD and every snapshot, chunk by chunk with checksums, in parallel.  Only
chunks that either side has allocated are read; elsewhere both read as
zeros.  Writes clients made to a live target after prepare show as HEAD
differences; snapshots must match exactly.
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Set, Tuple

import rbd

from .errors import Cancelled, Mismatch
from .formats.base import Format, Snapshot

CHUNK = 4 << 20
MAX_REPORTED = 8


@dataclass
class LayerReport:
    name: str                      # snapshot name, or 'HEAD'
    equal: bool = True
    source_size: int = 0
    target_size: int = 0
    bytes_compared: int = 0
    #: The first differing ranges, as [offset, length].
    differences: List[Tuple[int, int]] = field(default_factory=list)
    missing: bool = False          # the target lacks this snapshot


def _digest(data: bytes, length: int) -> bytes:
    """A checksum of ``data`` as if zero-padded to ``length`` (reads past an
    image's end come back short)."""
    h = hashlib.blake2b(data, digest_size=32)
    if len(data) < length:
        h.update(bytes(length - len(data)))
    return h.digest()


def _allocated_chunks(extents: Iterator[Tuple[int, int]], chunk: int) -> Set[int]:
    out: Set[int] = set()
    for offset, length in extents:
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return out


def _target_extents(image: rbd.Image, size: int) -> Iterator[Tuple[int, int]]:
    found: List[Tuple[int, int]] = []
    image.diff_iterate(0, size, None,
                       lambda off, length, exists: found.append((off, length)) if exists else None,
                       include_parent=True, whole_object=False)
    return iter(found)


def verify(source: Format, open_target: Callable[[Optional[str]], rbd.Image],
           progress: Callable[[int, int], bool], window: int = 8) -> List[LayerReport]:
    """Compare every layer; raise ``Mismatch`` naming the first differences."""
    layers: List[Optional[Snapshot]] = [*source.snapshots(), None]
    reports = []
    for index, snap in enumerate(layers):
        name = snap.name if snap is not None else 'HEAD'
        try:
            target = open_target(snap.name if snap is not None else None)
        except rbd.ImageNotFound:
            reports.append(LayerReport(name, equal=False, missing=True))
            continue
        with target:
            reports.append(_compare(source, snap, target, name, window,
                                    lambda done, total: progress(index * total + done,
                                                                 len(layers) * total)))
    bad = [r for r in reports if not r.equal]
    if bad:
        raise Mismatch('verify found differences: ' + '; '.join(_describe(r) for r in bad))
    return reports


def _describe(r: LayerReport) -> str:
    if r.missing:
        return f"the target has no snapshot '{r.name}'"
    if r.source_size != r.target_size:
        return f'{r.name}: size {r.target_size} on the target, {r.source_size} at the source'
    where = ', '.join(f'{off}+{length}' for off, length in r.differences)
    return f'{r.name}: differs at {where}'


def _compare(source: Format, snap: Optional[Snapshot], target: rbd.Image, name: str,
             window: int, progress: Callable[[int, int], bool]) -> LayerReport:
    report = LayerReport(name, source_size=source.size(snap), target_size=target.size())
    if report.source_size != report.target_size:
        report.equal = False
        return report
    size = report.source_size
    ours = ((e.offset, e.length) for e in source.extents(snap))
    chunks = sorted(_allocated_chunks(ours, CHUNK)
                    | _allocated_chunks(_target_extents(target, size), CHUNK))

    def check(index: int) -> Tuple[int, int, bool]:
        offset = index * CHUNK
        length = min(CHUNK, size - offset)
        ours = _digest(source.read(offset, length, snap), length)
        theirs = _digest(target.read(offset, length), length)
        return offset, length, ours == theirs

    with ThreadPoolExecutor(max_workers=window,
                            thread_name_prefix='rbd_migration verify') as pool:
        for done, (offset, length, same) in enumerate(pool.map(check, chunks), 1):
            report.bytes_compared += length
            if not same:
                report.equal = False
                if len(report.differences) < MAX_REPORTED:
                    report.differences.append((offset, length))
            if not progress(done, max(len(chunks), 1)):
                raise Cancelled('verify cancelled')
    return report


def summary(reports: List[LayerReport]) -> dict:
    return {'equal': all(r.equal for r in reports),
            'layers': [asdict(r) for r in reports],
            'bytes_compared': sum(r.bytes_compared for r in reports)}
