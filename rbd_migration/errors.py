"""Errors an operator may see.

Every failure that reaches the command line is a ``MigrationError``: one line,
naming the field or object at fault and the fix, carrying the errno that the
command layer returns.  Anything else escaping to the command layer is a bug
and is logged with its traceback, never printed.

``transient`` tells the task queue what to do with a failed step: retry it
with backoff (the cluster or the source may answer later) or fail the task
at once.  The names say which: SourceUnreachable and TransientClusterError
pass, SourceGone, SourceChanged and the rest do not.
"""
import errno as _errno


class MigrationError(Exception):
    """Base of every operator-facing error."""

    errno = _errno.EINVAL
    #: A transient error may succeed if the same step is retried later.
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MigrationError):
    errno = _errno.EINVAL


class NotFound(MigrationError):
    errno = _errno.ENOENT


class AlreadyExists(MigrationError):
    errno = _errno.EEXIST


class Busy(MigrationError):
    errno = _errno.EBUSY


class PermissionDenied(MigrationError):
    # EPERM, not EACCES: ceph-mgr appends "access denied: does your client
    # key have mgr caps?" to every EACCES reply, which would mislead here.
    errno = _errno.EPERM


class Unsupported(MigrationError):
    errno = _errno.EOPNOTSUPP


class NotMigrating(InvalidArgument):
    """The image exists but takes part in no migration."""


class Mismatch(MigrationError):
    """verify: source and target differ; commit would lose data."""

    errno = _errno.EBADMSG


class ModuleStarting(MigrationError):
    """A command came before the module restored its queue: ask again."""

    errno = _errno.EAGAIN
    transient = True


class ChildFailed(MigrationError):
    """What a child process running a librbd execute reported, with its
    errno and whether it may pass."""

    def __init__(self, message: str, code: int, transient: bool) -> None:
        super().__init__(message)
        self.errno = code
        self.transient = transient


class PoolFull(MigrationError):
    """The target's pool (or its quota) has no room: an operator must act."""

    errno = _errno.ENOSPC


class StillActive(MigrationError):
    """A task asked after has not ended yet (``task get``): EAGAIN tells
    scripts to ask again."""

    errno = _errno.EAGAIN


class SourceGone(MigrationError):
    """A migration's source image no longer exists (removed behind the
    module's back): only abort can go on."""

    errno = _errno.ENOENT


class TransientClusterError(MigrationError):
    """The cluster could not do it now (timeout, full, connection lost)."""

    transient = True

    def __init__(self, message: str, code: int = _errno.EAGAIN) -> None:
        super().__init__(message)
        self.errno = code


class SourceUnreachable(MigrationError):
    """The source could not be read right now (network, server, credentials
    that may come back); retried with backoff by the task queue."""

    errno = _errno.EIO
    transient = True


class Cancelled(MigrationError):
    errno = _errno.ECANCELED


class TimedOut(MigrationError):
    """An overall deadline passed (the probe's): the source answers too
    slowly to be imported as asked."""

    errno = _errno.ETIMEDOUT


class SourceChanged(MigrationError):
    """The source is no longer what it was at prepare (its size, ETag or
    modification time changed): what is copied would mix two versions."""

    errno = _errno.ESTALE
