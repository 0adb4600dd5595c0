"""The endpoint's listening socket, handed from a mgr to its respawn.

librbd clients of a live target fail a read when its connection to the
endpoint is refused (measured: ``ceph mgr fail`` of the only mgr, a reader
of random 4 KiB blocks every 10 ms saw 56 EIO errors in the half second the
mgr respawned).  A failed-over mgr respawns by ``execv`` into the same
process, so the listening socket is made inheritable: across the exec the
kernel keeps accepting connections into its backlog, clients' requests
wait there, and the next module instance adopts the socket and answers
them: a stall, not an error.

The socket must not outlive its use.  A mgr that comes back as a standby
closes it (``close_inherited``, from the module's standby class): otherwise
clients would wait on a socket nobody accepts from, and the new active mgr
on the same host could not bind the port.  The active one retries binding
for ``BIND_PATIENCE`` seconds meanwhile.

Only the module's own listener is taken over: its descriptor number is
kept in the process environment (``ENV``), which ``execv`` carries into the
respawn.  Another listener of the process at the same address (another mgr
module's, should the port be set to the dashboard's by mistake) is never
adopted or closed; binding then fails with the address in use.
"""
import errno
import logging
import os
import socket
import time
from typing import Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

#: How long the active mgr waits for the port a standby still holds.
BIND_PATIENCE = 15.0
BIND_RETRY = 0.25


#: The environment variable naming the descriptors of the module's listeners.
ENV = 'RBD_MIGRATION_LIVE_LISTENERS'


def _ours() -> List[int]:
    return [int(fd) for fd in os.environ.get(ENV, '').split(',') if fd.isdigit()]


def _keep(fds: List[int]) -> None:
    os.environ[ENV] = ','.join(str(fd) for fd in sorted(set(fds)))


def _drop(fd: int) -> None:
    _keep([f for f in _ours() if f != fd])


def forget(sock: socket.socket) -> None:
    """``sock`` (about to be closed) is no longer a listener to hand over."""
    try:
        _drop(sock.fileno())
    except OSError:
        pass


def _listeners(address: Tuple[str, int]) -> Iterator[Tuple[int, socket.socket]]:
    """The module's listening TCP sockets (``ENV``) bound to ``address``,
    each as its descriptor and a duplicate to use."""
    mine = set(_ours())
    try:
        fds = [int(name) for name in os.listdir('/proc/self/fd') if int(name) in mine]
    except OSError:
        return
    # Sockets only, all named before any is duplicated: a duplicate may take
    # a number the listing held (its own descriptor), and must not be found.
    sockets = []
    for fd in fds:
        try:
            if os.readlink(f'/proc/self/fd/{fd}').startswith('socket:'):
                sockets.append(fd)
        except OSError:
            continue
    for fd in sockets:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if (sock.type == socket.SOCK_STREAM and listening
                    and sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.getsockname()[:2] == address):
                yield fd, sock
                continue
        except OSError:
            pass
        sock.close()


def adopt(address: Tuple[str, int]) -> Optional[socket.socket]:
    """The listening socket for ``address`` a respawn handed over, if any
    (its inherited descriptor closed, a private duplicate returned)."""
    found: Optional[socket.socket] = None
    for fd, sock in _listeners(address):
        os.close(fd)
        _drop(fd)
        if found is None:
            found = sock
        else:
            sock.close()
    return found


def close_inherited(address: Tuple[str, int]) -> int:
    """Close what ``adopt`` would find; how many sockets."""
    count = 0
    for fd, sock in _listeners(address):
        os.close(fd)
        _drop(fd)
        sock.close()
        count += 1
    return count


def listen(address: Tuple[str, int], patience: float = BIND_PATIENCE) -> socket.socket:
    """A listening socket for ``address``, inheritable by a respawn: the
    one handed over if any, else bound, retrying while the address is in
    use (a standby that has not yet closed its inherited copy)."""
    sock = adopt(address)
    if sock is not None:
        log.info('live endpoint: took over the listening socket of %s:%d', *address)
    else:
        family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
        until = time.monotonic() + patience
        while True:
            try:
                sock = socket.create_server(address, family=family, backlog=128)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= until:
                    raise
                time.sleep(BIND_RETRY)
    sock.set_inheritable(True)
    _keep(_ours() + [sock.fileno()])
    return sock
