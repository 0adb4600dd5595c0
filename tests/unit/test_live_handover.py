"""The live endpoint's listening socket across an exec (a mgr respawn):
connections made while no process accepts wait in the backlog and are
answered by the process that adopts the socket; a standby that closes it
frees the port.  Real processes, real sockets."""
import errno
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest
import requests

from rbd_migration.context import SourceContext
from rbd_migration.live import handover
from rbd_migration.live.imports import LiveImports
from rbd_migration.live.server import TOKEN_BYTES
from tests.unit.test_live_server import SIZE, PatternView

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Run in a new process image holding the inherited socket: wait, then
#: adopt it (or close it) as the next module instance would.
CHILD = '''
import socket, sys, time
sys.path.insert(0, {repo!r})
from rbd_migration.live import handover
time.sleep({delay})
address = ('127.0.0.1', {port})
if {close}:
    print(handover.close_inherited(address), flush=True)
    time.sleep(5)
    sys.exit(0)
sock = handover.adopt(address)
assert sock is not None
conn, _ = sock.accept()
conn.sendall(b'answered by ' + str(__import__('os').getpid()).encode())
conn.close()
'''


def _child(sock: socket.socket, delay: float, close: bool = False) -> 'subprocess.Popen[bytes]':
    port = sock.getsockname()[1]
    code = CHILD.format(repo=REPO, delay=delay, port=port, close=close)
    return subprocess.Popen([sys.executable, '-c', code], pass_fds=[sock.fileno()],
                            stdout=subprocess.PIPE)


def test_listen_gives_an_inheritable_listening_socket() -> None:
    sock = handover.listen(('127.0.0.1', 0))
    try:
        assert sock.get_inheritable()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sock.close()


def test_a_connection_made_before_the_new_process_adopts_waits_and_is_answered() -> None:
    """The respawn: only the new image holds the socket, and it adopts it
    a moment later; a client that connects in between is answered."""
    sock = handover.listen(('127.0.0.1', 0))
    address = sock.getsockname()[:2]
    child = _child(sock, delay=0.5)
    sock.close()                             # the old image is gone
    try:
        started = time.monotonic()
        with socket.create_connection(address, timeout=20) as client:
            answer = client.recv(100)
        assert answer == f'answered by {child.pid}'.encode()
        assert time.monotonic() - started >= 0.3, 'answered only once adopted'
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        child.wait()


def test_a_standby_closing_the_inherited_socket_frees_the_port() -> None:
    sock = handover.listen(('127.0.0.1', 0))
    address = sock.getsockname()[:2]
    child = _child(sock, delay=0.0, close=True)
    sock.close()
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b'1'
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5)
        again = handover.listen(address, patience=0)   # the active mgr binds it
        again.close()
    finally:
        child.kill()
        child.wait()


def test_only_the_endpoint_address_is_adopted_or_closed() -> None:
    ours = handover.listen(('127.0.0.1', 0))
    address = ours.getsockname()[:2]
    inherited = ours.detach()            # as a respawn finds it: a bare descriptor
    other = socket.create_server(('127.0.0.1', 0))
    try:
        assert handover.close_inherited(('127.0.0.1', 1)) == 0
        adopted = handover.adopt(address)
        assert adopted is not None and adopted.getsockname()[:2] == address
        with pytest.raises(OSError):
            os.fstat(inherited)              # the inherited descriptor is closed
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        adopted.close()
    finally:
        other.close()


def test_another_modules_listener_at_the_address_is_never_taken() -> None:
    """The port set to another mgr module's (the dashboard's) by mistake:
    its listener, in the same process, is neither adopted nor closed, and
    the endpoint does not start; the other module keeps serving."""
    dashboard = socket.create_server(('127.0.0.1', 0))
    address = dashboard.getsockname()[:2]
    try:
        assert handover.adopt(address) is None
        assert handover.close_inherited(address) == 0
        live = LiveImports(lambda stop: SourceContext())
        saved = handover.listen.__defaults__
        handover.listen.__defaults__ = (0.2,)
        try:
            live.start(address[0], address[1], '127.0.0.1')
        finally:
            handover.listen.__defaults__ = saved
        assert live.server is None and 'live_endpoint_port' in live.down
        assert dashboard.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with socket.create_connection(address, timeout=5):
            accepted, _ = dashboard.accept()     # still the dashboard's
            accepted.close()
    finally:
        dashboard.close()


def test_a_stopped_endpoint_is_not_handed_over() -> None:
    live = LiveImports(lambda stop: SourceContext())
    live.start('127.0.0.1', 0, '127.0.0.1')
    assert live.server is not None
    address = live.server.address
    live.stop()
    assert handover.adopt(address) is None


def test_binding_waits_for_a_port_still_held_within_patience() -> None:
    """Another process (a standby not yet done) holds the port."""
    port = socket.create_server(('127.0.0.1', 0))
    address: Tuple[str, int] = port.getsockname()[:2]
    port.close()
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import socket, sys, time\n'
         f's = socket.create_server({address!r})\n'
         'print("held", flush=True)\n'
         'time.sleep(float(sys.stdin.readline()))\n'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b'held\n'
        with pytest.raises(OSError) as refused:
            handover.listen(address, patience=0.3)
        assert refused.value.errno == errno.EADDRINUSE
        got: List[socket.socket] = []
        binder = threading.Thread(
            target=lambda: got.append(handover.listen(address, patience=10)))
        binder.start()
        holder.stdin.write(b'0.5\n')
        holder.stdin.flush()
        binder.join(timeout=15)
        assert got and got[0].getsockname()[:2] == address
        got[0].close()
    finally:
        holder.kill()
        holder.wait()


def test_views_are_served_before_the_first_connection_is_answered() -> None:
    """A client that connects while the endpoint starts (a mgr respawn)
    is answered once the views registered before serving are in: never a
    404, which librbd would take for a source holding zeros there."""
    live = LiveImports(lambda stop: SourceContext())
    token = secrets.token_urlsafe(TOKEN_BYTES)
    answers: List[int] = []
    clients: List[threading.Thread] = []
    free = socket.create_server(('127.0.0.1', 0))
    address = free.getsockname()[:2]
    free.close()

    def restore() -> None:
        server = live.server
        assert server is not None
        url = server.url(token)
        clients.append(threading.Thread(
            target=lambda: answers.append(requests.head(url, timeout=20).status_code)))
        clients[0].start()
        time.sleep(0.5)                    # the client is connected and waits
        assert answers == []
        server.add(PatternView(SIZE), token)

    try:
        live.start(address[0], address[1], '127.0.0.1', before_serving=restore)
        clients[0].join(20)
        assert answers == [200]
    finally:
        live.stop()
