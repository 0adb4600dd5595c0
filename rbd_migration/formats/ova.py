"""An OVA: the VMware disks inside a tar archive, read in place.

An OVA is an uncompressed tar of an OVF descriptor, a manifest and the disks
(streamOptimized vmdk, usually).  A tar member's bytes lie contiguous in the
archive, so a disk is read as a window of the archive's stream, over any
stream type, without unpacking.  With several disks, the spec's ``disk``
names one (its member name, or its index among the disks); a descriptor's
extent files are looked up among the archive's members.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams import open_stream
from ..streams.base import Stream
from .vmdk import VmdkFormat

BLOCK = 512
#: Members read at most (an OVA holds a handful).
MAX_MEMBERS = 10_000
#: Longest GNU long name or pax header read.
MAX_EXTENDED = 64 << 10
FIELD = 'source-spec: disk'


@dataclass(frozen=True)
class Member:
    name: str
    offset: int     # of its data in the archive
    size: int


class MemberStream(Stream):
    """One member of the archive, as a stream of its own."""

    def __init__(self, archive: Stream, member: Member,
                 members: Mapping[str, Member]) -> None:
        self._archive = archive
        self._member = member
        self._members = members
        self.description = f'{archive.description} (member {member.name!r})'
        self.request_size = archive.request_size
        self.merge_gap = archive.merge_gap
        self.merge_limit = archive.merge_limit

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'MemberStream':
        raise NotImplementedError('members are opened through their archive')

    def size(self) -> int:
        return self._member.size

    def _read(self, offset: int, length: int) -> bytes:
        return self._archive.read(self._member.offset + offset, length)

    def _read_into(self, offset: int, view: memoryview) -> int:
        return self._archive.read_into(self._member.offset + offset, view)

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]]) -> List[int]:
        """Cut at the member's end, then merged by the archive's stream."""
        self._check_open()
        inside = []
        for offset, view in pieces:
            if offset < 0:
                raise ValueError(f'bad read: offset={offset}')
            n = max(0, min(len(view), self._member.size - offset))
            inside.append((self._member.offset + offset, view[:n]))
        return self._archive.read_pieces(inside)

    def validators(self) -> Dict[str, str]:
        return self._archive.validators()

    def sibling(self, name: str) -> Stream:
        member = self._members.get(name)
        if member is None:
            raise InvalidArgument(f"{self._archive.description}: the archive has no "
                                  f"member '{name}'")
        return MemberStream(self._archive, member, self._members)


class OvaFormat(VmdkFormat):
    """The disk an OVA's spec chooses, read as a vmdk."""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'OvaFormat':
        archive = open_stream(spec['stream'], ctx)
        try:
            members = {m.name: m for m in _members(archive, ctx)}
            disk = _choose(members, spec.get('disk'), archive.description)
            fmt = cls._open(MemberStream(archive, disk, members), [archive], ctx)
        except BaseException:
            archive.close()
            raise
        assert isinstance(fmt, OvaFormat)
        return fmt


def _choose(members: Mapping[str, Member], wanted: Union[str, int, None],
            where: str) -> Member:
    disks = [m for m in members.values() if m.name.lower().endswith('.vmdk')]
    names = ', '.join(repr(d.name) for d in disks) or 'none'
    if isinstance(wanted, str):
        if wanted not in members:
            raise InvalidArgument(f"{FIELD}: {where} has no member '{wanted}'; its "
                                  f'disks are {names}')
        return members[wanted]
    if isinstance(wanted, int):
        if not 0 <= wanted < len(disks):
            raise InvalidArgument(f'{FIELD}: {where} has {len(disks)} disk(s) ({names}); '
                                  f'give an index below {len(disks)}')
        return disks[wanted]
    if len(disks) != 1:
        raise InvalidArgument(f'{FIELD}: {where} holds {len(disks)} disks ({names}); '
                              'name the one to import with "disk"')
    return disks[0]


def _members(archive: Stream, ctx: SourceContext) -> Iterator[Member]:
    """The archive's regular files (ustar, GNU long names, pax paths)."""
    where = archive.description
    size = archive.size()
    pos = 0
    long_name = ''
    for _ in range(MAX_MEMBERS * 2):
        ctx.check()
        header = archive.read(pos, BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            return
        if not _checksum_ok(header):
            raise InvalidArgument(f'{where}: not an OVA (a tar header at byte {pos} '
                                  'does not check out); check "type"')
        length = _octal(header[124:136], where)
        kind = header[156:157]
        data = pos + BLOCK
        if data + length > size:
            raise InvalidArgument(f'{where}: the OVA is cut short (member at byte '
                                  f'{pos} ends past its end)')
        if kind in (b'L', b'x'):
            if length > MAX_EXTENDED:
                raise InvalidArgument(f'{where}: a tar extended header of {length} bytes')
            text = archive.read(data, length).split(b'\0', 1)[0].decode('utf-8', 'replace')
            long_name = text if kind == b'L' else _pax_path(text)
        elif kind in (b'0', b'\0', b''):
            name = long_name or _header_name(header)
            long_name = ''
            yield Member(name[2:] if name.startswith('./') else name, data, length)
        else:
            long_name = ''
        pos = data + -(-length // BLOCK) * BLOCK
    raise InvalidArgument(f'{where}: more than {MAX_MEMBERS} members in the OVA')


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b'\0', 1)[0].strip() or b'-1', 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _octal(field: bytes, where: str) -> int:
    if field[0] & 0x80:          # GNU base-256 for large sizes
        return int.from_bytes(field[1:], 'big')
    try:
        return int(field.split(b'\0', 1)[0].strip() or b'0', 8)
    except ValueError:
        raise InvalidArgument(f'{where}: not an OVA (a tar size field is not a '
                              'number); check "type"') from None


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b'\0', 1)[0].decode('utf-8', 'replace')
    if header[257:262] == b'ustar':
        prefix = header[345:500].split(b'\0', 1)[0].decode('utf-8', 'replace')
        if prefix:
            name = f'{prefix}/{name}'
    return name


def _pax_path(text: str) -> str:
    for record in text.splitlines():
        _, _, rest = record.partition(' ')
        key, eq, value = rest.partition('=')
        if eq and key == 'path':
            return value
    return ''
