"""A local file as a stream, confined to the directories the operator allows.

The mgr runs as a privileged daemon; a source-spec is operator input that may
name any path.  So a path is only opened when its real location (``..`` and
symlinks resolved) lies under one of ``mgr/rbd_migration/file_source_roots``,
and only regular files are read (no devices, fifos or directories).

The checks hold for the file the stream reads, not for a name: the opened
descriptor itself is checked (its real path and inode), and every read goes
through that descriptor for the stream's whole life, so a symlink or file
swapped in under the same name afterwards is never read.  The file's size,
modification time and inode are pinned at open: one that shrinks while it is
read fails the read (``SourceChanged``) instead of importing zeros.
"""
import errno
import os
import stat
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceChanged, SourceUnreachable)
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


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FileStream(Stream):
    """One read-only fd, read with ``os.pread`` so threads share no offset."""

    def __init__(self, path: str, fd: int, ctx: SourceContext, what: str,
                 pinned: os.stat_result) -> None:
        self.path = path
        self.description = f'file {path}'
        self._fd = fd
        self._ctx = ctx
        self._what = what
        #: The file as opened: what every later read must still find.
        self._pinned = pinned
        self._size = pinned.st_size
        self._close_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'FileStream':
        path = spec.get('file_path')
        if not isinstance(path, str) or not os.path.isabs(path):
            raise InvalidArgument(
                f'{FIELD}: {path!r} is not an absolute path; give the full '
                f'path of the image file on the host of the active mgr')
        return cls.open(path, ctx, f'{FIELD}: {path!r}')

    @classmethod
    def open(cls, path: str, ctx: SourceContext, what: str,
             named: Optional[str] = None) -> 'FileStream':
        """Open ``path`` after the root and file-type checks, then check the
        opened descriptor again: only what it holds is ever read.

        ``what`` starts every message, naming the field or backing reference
        at fault; ``named`` is the name as written there (default ``path``),
        so that a message shows the real path when it differs.
        """
        named = path if named is None else named
        real_roots = _real_roots(ctx.allowed_file_roots)
        if not real_roots:
            raise PermissionDenied(
                f'{what} is not under an allowed directory; allow one with '
                f'`ceph config set mgr {ROOTS_OPTION} /srv/images`')
        # Checked before opening too: opening a device node can have effects
        # of its own (a watchdog arms), and a fifo outside the roots is none
        # of ours to touch.
        real = os.path.realpath(path)
        cls._check_under(real, named, real_roots, what)
        before = cls._stat(real, what)
        cls._check_kind(before, what)
        try:
            # O_NONBLOCK: should the path be swapped for a fifo after the
            # stat, open must not hang; the fstat below then refuses it.
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK)
        except OSError as e:
            raise cls._os_error(what, e) from None
        try:
            pinned = cls._check_opened(fd, before, real, named, real_roots,
                                       what)
        except BaseException:
            os.close(fd)
            raise
        return cls(os.path.normpath(path), fd, ctx, what, pinned)

    @classmethod
    def _stat(cls, real: str, what: str) -> os.stat_result:
        try:
            return os.stat(real)
        except FileNotFoundError:
            raise NotFound(f'{what} does not exist; check the path on the '
                           f'host of the active mgr') from None
        except OSError as e:
            raise cls._os_error(what, e) from None

    @staticmethod
    def _check_kind(st: os.stat_result, what: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f'{what} is {_kind(st.st_mode)}; give the '
                                  f'path of a regular image file')

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
    def _check_opened(cls, fd: int, before: os.stat_result, real: str,
                      named: str, real_roots: List[str],
                      what: str) -> os.stat_result:
        """Close the race between the checks and ``open``: the fd itself must
        be the regular file that was checked, still under a root.  Returns
        its fstat, which the stream pins."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _same_file(st, before):
            raise PermissionDenied(f'{what} changed while it was opened; '
                                   f'retry once the file is in place')
        opened = cls._opened_path(fd, st, real, what)
        cls._check_under(opened, named, real_roots, what)
        os.set_blocking(fd, True)
        return st

    @staticmethod
    def _opened_path(fd: int, st: os.stat_result, real: str, what: str) -> str:
        """Where the opened file really is: the kernel's name for the fd, or
        (without /proc) its name resolved afresh, if that still leads to the
        inode opened."""
        try:
            return os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            pass
        again = os.path.realpath(real)
        try:
            if _same_file(os.stat(again), st):
                return again
        except OSError:
            pass
        raise PermissionDenied(f'{what} changed while it was opened; '
                               f'retry once the file is in place')

    @staticmethod
    def _os_error(what: str, e: OSError) -> MigrationError:
        if isinstance(e, PermissionError):
            return PermissionDenied(
                f'{what} cannot be read by the mgr ({e.strerror}); make it '
                f'readable by the user that ceph-mgr runs as')
        return SourceUnreachable(f'{what} cannot be opened ({e.strerror})')

    def sibling(self, name: str) -> 'FileStream':
        """The file a qcow2 header names (backing or data file): relative names
        resolve against this file's directory, as QEMU does; the same root
        checks apply, to the file opened."""
        path = name if os.path.isabs(name) else \
            os.path.join(os.path.dirname(self.path), name)
        return self.open(os.path.normpath(path), self._ctx,
                         f'{FIELD}: {name!r} (named in {self.path!r})', name)

    def size(self) -> int:
        """The size pinned at open: a file that grows later is read only as
        far as it reached then; one that shrinks fails its reads."""
        self._checked_fd()
        return self._size

    def validators(self) -> Dict[str, str]:
        """The open file's size, modification time and inode, read afresh:
        a write changes the first two, a file swapped in under the same name
        (seen by the next open) the last."""
        st = os.fstat(self._checked_fd())
        return {'size': str(st.st_size), 'mtime_ns': str(st.st_mtime_ns),
                'ino': str(st.st_ino)}

    def allocated(self, offset: int, length: int) -> Iterator[Tuple[int, int]]:
        """Data ranges by SEEK_DATA/SEEK_HOLE, so a sparse file's holes are
        never read (lseek moves the shared offset, which pread ignores)."""
        fd, end = self._checked_fd(), min(offset + length, self._size)
        pos = offset
        while pos < end:
            self._ctx.check()
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # cannot tell: read it all
                    yield pos, end - pos
                    return
                self._check_not_shrunk(end)  # no data after pos, or shrunk
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            yield data, hole - data
            pos = hole

    def _read(self, offset: int, length: int) -> bytes:
        fd = self._checked_fd()
        want = length
        chunks: List[bytes] = []
        done = 0
        while done < want:
            self._ctx.check()
            try:
                chunk = os.pread(fd, want - done, offset + done)
            except OSError as e:
                raise self._failed(e, length, offset + done) from None
            if not chunk:
                raise self._shrunk()
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b''.join(chunks)

    def _read_into(self, offset: int, view: memoryview) -> int:
        fd = self._checked_fd()
        want = len(view)
        done = 0
        while done < want:
            self._ctx.check()
            try:
                n = os.preadv(fd, [view[done:want]], offset + done)
            except OSError as e:
                raise self._failed(e, len(view), offset + done) from None
            if not n:
                raise self._shrunk()
            done += n
        return done

    def _check_not_shrunk(self, end: int) -> None:
        """Where the file seems to end before ``end``, it must be because it
        ends there for real: not because it shrank since it was opened."""
        now = os.fstat(self._checked_fd()).st_size
        if now < min(end, self._size):
            raise self._shrunk()

    def _shrunk(self) -> SourceChanged:
        now = os.fstat(self._checked_fd()).st_size
        return SourceChanged(
            f'{self._what}: the file shrank from {self._size} to {now} bytes '
            f'while it was read; do not change the image while it is imported')

    def _failed(self, e: OSError, length: int, at: int) -> SourceUnreachable:
        return SourceUnreachable(f'{self.description}: read of {length} bytes at '
                                 f'{at} failed ({e.strerror})')

    def _checked_fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ValueError(f'{self.description}: stream is closed')
        return fd

    def close(self) -> None:
        super().close()
        with self._close_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
