"""A local file as a stream, confined to the directories the operator allows.

The mgr runs as a privileged daemon; a source-spec is operator input that may
name any path.  So a path is only opened when its real location (``..`` and
symlinks resolved) lies under one of ``mgr/rbd_migration/file_source_roots``,
and only regular files are read (no devices, fifos or directories).
"""
import os
import stat
import threading
from typing import Any, Iterator, List, Mapping, Optional, Tuple

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceUnavailable)
from .base import Stream

ROOTS_OPTION = 'mgr/rbd_migration/file_source_roots'
FIELD = 'source-spec: stream.file_path'


def _real_roots(roots: List[str]) -> List[str]:
    return [os.path.realpath(r) for r in roots if r]


def _is_under(path: str, roots: List[str]) -> bool:
    return any(os.path.commonpath([root, path]) == root for root in roots)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, 'a directory'),
                       (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISFIFO, 'a fifo'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return name
    return 'not a regular file'


class FileStream(Stream):
    """One read-only fd, read with ``os.pread`` so threads share no offset."""

    def __init__(self, path: str, fd: int, roots: List[str]) -> None:
        self.path = path
        self.description = f'file {path}'
        self._fd = fd
        self._roots = roots
        self._close_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'FileStream':
        path = spec.get('file_path')
        if not isinstance(path, str) or not os.path.isabs(path):
            raise InvalidArgument(
                f'{FIELD}: {path!r} is not an absolute path; give the full '
                f'path of the image file on the host of the active mgr')
        return cls.open(path, ctx.allowed_file_roots, f'{FIELD}: {path!r}')

    @classmethod
    def open(cls, path: str, roots: List[str], what: str,
             named: Optional[str] = None) -> 'FileStream':
        """Open ``path`` after the root and file-type checks.

        ``what`` starts every message, naming the field or backing reference
        at fault; ``named`` is the name as written there (default ``path``),
        so that a message shows the real path when it differs.
        """
        named = path if named is None else named
        real_roots = _real_roots(roots)
        if not real_roots:
            raise PermissionDenied(
                f'{what} is not under an allowed directory; allow one with '
                f'`ceph config set mgr {ROOTS_OPTION} /srv/images`')
        real = os.path.realpath(path)
        cls._check_under(real, named, real_roots, what)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise NotFound(f'{what} does not exist; check the path on the '
                           f'host of the active mgr') from None
        except OSError as e:
            raise cls._os_error(what, e) from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f'{what} is {_kind(st.st_mode)}; give the '
                                  f'path of a regular image file')
        try:
            # O_NONBLOCK: should the path be swapped for a fifo after the
            # stat, open must not hang; the fstat below then refuses it.
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK)
        except OSError as e:
            raise cls._os_error(what, e) from None
        try:
            cls._check_opened(fd, st, named, real_roots, what)
        except BaseException:
            os.close(fd)
            raise
        return cls(os.path.normpath(path), fd, roots)

    @staticmethod
    def _check_under(real: str, named: str, real_roots: List[str],
                     what: str) -> None:
        if _is_under(real, real_roots):
            return
        resolved = f' (it resolves to {real!r})' if real != named else ''
        raise PermissionDenied(
            f'{what} is not under an allowed directory{resolved}; move the '
            f'image under one of {", ".join(real_roots)} or add its '
            f'directory to {ROOTS_OPTION}')

    @classmethod
    def _check_opened(cls, fd: int, before: os.stat_result, named: str,
                      real_roots: List[str], what: str) -> None:
        """Close the race between the checks and ``open``: the fd itself must
        be the regular file that was checked, still under a root."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or \
                (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise PermissionDenied(f'{what} changed while it was opened; '
                                   f'retry once the file is in place')
        try:
            opened: Optional[str] = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            opened = None  # no /proc: the inode check above has to do
        if opened is not None:
            cls._check_under(opened, named, real_roots, what)
        os.set_blocking(fd, True)

    @staticmethod
    def _os_error(what: str, e: OSError) -> MigrationError:
        if isinstance(e, PermissionError):
            return PermissionDenied(
                f'{what} cannot be read by the mgr ({e.strerror}); make it '
                f'readable by the user that ceph-mgr runs as')
        return SourceUnavailable(f'{what} cannot be opened ({e.strerror})')

    def sibling(self, name: str) -> 'FileStream':
        """The file a qcow2 header names (backing or data file): relative names
        resolve against this file's directory, as QEMU does; the same root
        checks apply."""
        path = name if os.path.isabs(name) else \
            os.path.join(os.path.dirname(self.path), name)
        return self.open(os.path.normpath(path), self._roots,
                         f'{FIELD}: {name!r} (named in {self.path!r})', name)

    def size(self) -> int:
        return os.fstat(self._checked_fd()).st_size

    def allocated(self, offset: int, length: int) -> Iterator[Tuple[int, int]]:
        """Data ranges by SEEK_DATA/SEEK_HOLE, so a sparse file's holes are
        never read (lseek moves the shared offset, which pread ignores)."""
        fd, end = self._checked_fd(), offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            yield data, hole - data
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        fd = self._checked_fd()
        chunks: List[bytes] = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(fd, length - done, offset + done)
            except OSError as e:
                raise self._failed(e, length, offset + done) from None
            if not chunk:
                break  # end of file
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b''.join(chunks)

    def read_into(self, offset: int, view: memoryview) -> int:
        if offset < 0:
            raise ValueError(f'bad read: offset={offset}')
        fd = self._checked_fd()
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise self._failed(e, len(view), offset + done) from None
            if not n:
                break  # end of file
            done += n
        return done

    def _failed(self, e: OSError, length: int, at: int) -> SourceUnavailable:
        return SourceUnavailable(f'{self.description}: read of {length} bytes at '
                                 f'{at} failed ({e.strerror})')

    def _checked_fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ValueError(f'{self.description}: stream is closed')
        return fd

    def close(self) -> None:
        with self._close_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
