"""librbd's and librados' errnos as operator-facing errors.

librbd raises bare errno exceptions; an operator needs the image, what was
being done and, where there is one, the fix.  Errnos with no kind of their
own are taken for passing cluster trouble, which the task queue retries.
"""
import errno
import os

from .errors import (AlreadyExists, Busy, Cancelled, InvalidArgument,
                      MigrationError, NotFound, PermissionDenied, TransientClusterError,
                      Unsupported)


_KINDS = {
    errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists, errno.EBUSY: Busy,
    errno.EINVAL: InvalidArgument, errno.ERANGE: InvalidArgument,
    errno.EDOM: InvalidArgument, errno.EROFS: InvalidArgument,
    errno.ENAMETOOLONG: InvalidArgument,
    errno.EOPNOTSUPP: Unsupported, errno.ENOSYS: Unsupported,
    errno.EACCES: PermissionDenied, errno.EPERM: PermissionDenied,
    errno.ECANCELED: Cancelled,
}


def _strerror(code: int) -> str:
    return os.strerror(code).lower()


def translate(e: Exception, doing: str) -> MigrationError:
    """A librbd/librados exception as an operator-facing error."""
    code = abs(getattr(e, 'errno', None) or errno.EIO)
    reason = errno.errorcode.get(code, str(code))
    text = f'{doing}: {_strerror(code)} ({reason})'
    if code == errno.EINVAL:
        # librbd says why only in its log; point there rather than at nothing.
        text += "; librbd logs its reason in the active mgr's log"
    kind = _KINDS.get(code)
    if kind is None:
        return TransientClusterError(text, code)
    err = kind(text)
    err.errno = code
    return err


def in_use(doing: str, image: object) -> TransientClusterError:
    """librbd refuses to remove an image some client watches.  Often that
    is a passing one (a status query opens both images of a migration, a
    failed mgr's watch lingers for a while): retried, with the reason."""
    return TransientClusterError(f'{doing}: {image} is open by another client '
                                 f"(see 'rbd status {image}'); retrying until it is closed",
                                 errno.EBUSY)


def name_taken(doing: str) -> MigrationError:
    """The source's name is free while it sits in the trash, and nothing
    stops a client from creating an image under it."""
    return AlreadyExists(f'{doing}: the source cannot get its name back, another image '
                         'was created under it since prepare; rename that image '
                         "('rbd rename'), then run abort again")
