"""What ``ceph progress``, ``ceph -s`` and the dashboard say about a task is
what the task does.

One event per task for its whole life: it stays open while the task waits
to retry (saying so), completes only when the task completes, and fails
(saying "cancelled" or why) when the task is cancelled, aborted or fails; a
failed-over mgr opens the same event again.  Messages carry no percentage.
Imports take the adapter engine from a raw image that a Python HTTP server
on 127.0.0.1 serves, answers 503 or 404 for, or stops serving (connection
refused) on demand.  The dashboard's ``/api/summary`` is checked too when
the dashboard module is installed.  Every wait is bounded.
"""
import errno
import http.server
import json
import os
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from qa.cluster import Cluster

IMAGE = 32 << 20
RUN = uuid.uuid4().hex[:6]
#: Each 64 KiB block holds its own number: nothing the copier may skip.
DATA = b''.join(n.to_bytes(4, 'little') * 16384 for n in range(IMAGE >> 16))
API = 'application/vnd.ceph.api.v1.0+json'
USER, PASSWORD = 'rbdmigration-progress', 'Rbd-Migration-Progress-1'


# -- the source ------------------------------------------------------------------

class Source:
    """A raw image over HTTP that can answer an error status for every
    request, or go away and come back on the same port."""

    def __init__(self) -> None:
        self.status = 0                     # 0: serve; else answer this
        self.port = 0
        self.server: Optional[socketserver.ThreadingTCPServer] = None
        self.live: Set[socket.socket] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}/disk.raw'

    def start(self) -> None:
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.0'   # one request a connection: stop is stop

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with source.lock:
                    source.live.add(self.connection)

            def finish(self) -> None:
                with source.lock:
                    source.live.discard(self.connection)
                super().finish()

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                if source.status:
                    self.send_response(source.status)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                rng = self.headers.get('Range')
                first, last = 0, IMAGE - 1
                if rng and not head:
                    a, b = rng[len('bytes='):].split('-')
                    first, last = int(a), min(int(b or IMAGE - 1), IMAGE - 1)
                self.send_response(206 if rng and not head else 200)
                self.send_header('Accept-Ranges', 'bytes')
                self.send_header('Content-Length', str(last - first + 1))
                if rng and not head:
                    self.send_header('Content-Range', f'bytes {first}-{last}/{IMAGE}')
                self.end_headers()
                if not head:
                    self.wfile.write(DATA[first:last + 1])

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(('127.0.0.1', self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Refuse connections from now on, and cut the ones in flight."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.lock:
            for conn in list(self.live):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def source() -> Iterator[Source]:
    s = Source()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def quick(cluster: Cluster) -> Iterator[None]:
    """Retries a second or two apart, enough of them, and copies that take
    a few seconds, one 4 MiB chunk after the other (eight in all), so that a
    task is seen running part-way and waiting."""
    opts = {'retry_backoff': '1', 'retry_max_backoff': '2', 'retry_max_attempts': '20',
            'adapter_bandwidth_mbps': '4', 'adapter_concurrency': '1'}
    for k, v in opts.items():
        cluster.ceph('config', 'set', 'mgr', f'mgr/rbd_migration/{k}', v)
    time.sleep(1)   # the mgr learns of config changes asynchronously
    yield
    for k in opts:
        cluster.reset_module_option(k)


# -- the dashboard ---------------------------------------------------------------------

class Dashboard:
    """The REST API the dashboard's Tasks and Notifications panel polls."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip('/')
        self.token: Optional[str] = None

    def _request(self, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        headers = {'Accept': API, 'Content-Type': 'application/json'}
        if self.token:
            headers['Authorization'] = f'Bearer {self.token}'
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=15) as answer:
            return json.loads(answer.read())

    def summary(self, timeout: float = 60) -> Dict[str, Any]:
        """``/api/summary``, logging in as needed and riding out the
        dashboard's restart with its mgr."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.token is None:
                    self.token = self._request('/api/auth', {'username': USER,
                                                             'password': PASSWORD})['token']
                answer: Dict[str, Any] = self._request('/api/summary')
                return answer
            except (urllib.error.URLError, OSError, ValueError) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code == 401:
                    self.token = None
                if time.monotonic() > deadline:
                    raise AssertionError(f'/api/summary did not answer: {e}') from None
                time.sleep(1)

    def tasks(self, task_id: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """The executing and finished dashboard tasks of one module task."""
        s = self.summary()

        def ours(t: Dict[str, Any]) -> bool:
            return str((t.get('metadata') or {}).get('task_id')) == task_id
        return ([t for t in s['executing_tasks'] if ours(t)],
                [t for t in s['finished_tasks'] if ours(t)])


@pytest.fixture(scope='module')
def dashboard(cluster: Cluster) -> Iterator[Optional[Dashboard]]:
    """The dashboard, enabled for these tests and disabled after them, or
    None where the dashboard module is not installed."""
    if not os.path.isdir(cluster.path('mgr-modules', 'dashboard')):
        yield None
        return
    was_on = 'dashboard' in cluster.ceph_json('mgr', 'services')
    url = cluster.enable_dashboard(USER, PASSWORD)
    try:
        yield Dashboard(url)
    finally:
        cluster.ceph('dashboard', 'ac-user-delete', USER, check=False)
        if not was_on:
            cluster.ceph('mgr', 'module', 'disable', 'dashboard')
            deadline = time.monotonic() + 60
            while 'dashboard' in cluster.ceph_json('mgr', 'services') \
                    and time.monotonic() < deadline:
                time.sleep(1)
            cluster.wait_module()


# -- helpers ---------------------------------------------------------------------------

def _spec(url: str) -> str:
    return json.dumps({'type': 'raw', 'stream': {'type': 'http', 'url': url},
                       'rbd_migration': {'engine': 'adapter'}})


def _event_id(task_id: str) -> str:
    return f'rbd_migration/task/{task_id}'


def _progress(cluster: Cluster, task_id: str) -> Tuple[Optional[Dict[str, Any]],
                                                        List[Dict[str, Any]]]:
    """The task's open event (or None) and its completed ones."""
    p = cluster.ceph_json('progress', 'json')
    eid = _event_id(task_id)
    open_ = [e for e in p['events'] if e['id'] == eid]
    return (open_[0] if open_ else None), [e for e in p['completed'] if e['id'] == eid]


def _task(cluster: Cluster, task_id: str) -> Dict[str, Any]:
    tasks = cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
    found: Dict[str, Any] = next(t for t in tasks if str(t['id']) == task_id)
    return found


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f'{what}: not within {timeout:.0f}s')
        time.sleep(0.2)


def _prepare(cluster: Cluster, source: Source, kind: str) -> str:
    image = f'rbd/progress-{kind}-{RUN}'
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', image,
                 '--source-spec', _spec(source.url))
    return image


def _execute(cluster: Cluster, image: str) -> Tuple[str, str]:
    """Queue the execute: its task id and message."""
    task = cluster.ceph_json('rbd', 'migration', 'execute', image)['task']
    return str(task['id']), str(task['message'])


def _abort(cluster: Cluster, image: str) -> None:
    r = cluster.run_ceph('rbd', 'migration', 'abort', image, '--format', 'json')
    if r.returncode == 0:
        cluster.task_end(str(json.loads(r.stdout)['task']['id']), timeout=60)


def _waiting(cluster: Cluster, task_id: str) -> Optional[Dict[str, Any]]:
    """The open event, once the task waits to retry and the event says so."""
    event, completed = _progress(cluster, task_id)
    assert not completed, f'an event of a task still under way was ended: {completed}'
    if event and 'waiting to retry, attempt ' in event['message']:
        return event
    return None


def _no_percent(*texts: Optional[str]) -> None:
    for text in texts:
        assert '%' not in (text or ''), f'a percentage in an event text: {text!r}'


def _one_end(cluster: Cluster, task_id: str, failed: bool) -> Dict[str, Any]:
    """The task's only completed event, once there (its end is reported
    right after the task's)."""
    def ended() -> Optional[Dict[str, Any]]:
        event, completed = _progress(cluster, task_id)
        if not completed:
            return None
        assert event is None, f'open and ended at once: {event}'
        assert len(completed) == 1, f'one event ended more than once: {completed}'
        return completed[0]
    end: Dict[str, Any] = _wait(f'the end of task {task_id} in ceph progress json',
                                ended, 30)
    assert bool(end.get('failed')) == failed, end
    return end


def _dashboard_waiting(dashboard: Dashboard, task_id: str) -> Optional[Dict[str, Any]]:
    """The task's one running dashboard task, once it says it waits to
    retry; never a finished one meanwhile."""
    executing, finished = dashboard.tasks(task_id)
    assert finished == [], f'a task still under way shows as finished: {finished}'
    assert len(executing) == 1, executing
    return executing[0] if 'waiting to retry' in executing[0]['name'] else None


def _dashboard_end(dashboard: Optional[Dashboard], task_id: str, message: str,
                   success: bool) -> Optional[Dict[str, Any]]:
    if dashboard is None:
        return None
    executing, finished = dashboard.tasks(task_id)
    assert executing == [] and len(finished) == 1, (executing, finished)
    [done] = finished
    assert done['success'] is success, done
    assert done['name'] == f'progress/{message}', done
    return done


# -- tests ----------------------------------------------------------------------------------

def test_a_retry_wait_is_one_open_event_then_one_success(
        cluster: Cluster, source: Source, quick: None,
        dashboard: Optional[Dashboard]) -> None:
    """The operator's case: the source answers 503 for a while mid-copy."""
    image = _prepare(cluster, source, 'retry')
    try:
        task_id, message = _execute(cluster, image)
        cluster.task_running(task_id, past=0.1, timeout=60)
        source.status = 503
        waiting = _wait('the event saying the task waits to retry',
                        lambda: _waiting(cluster, task_id), 60)
        assert waiting['message'].startswith(f'{message}: waiting to retry, attempt ')
        assert '/20: ' in waiting['message'] and 'HTTP 503' in waiting['message']
        assert 0.1 <= waiting['progress'] < 1.0, waiting
        _no_percent(waiting['message'])
        status = cluster.ceph_json('status')['progress_events']
        assert _event_id(task_id) in status, status
        assert _task(cluster, task_id)['state'] in ('waiting to retry', 'running')
        if dashboard is not None:
            shown = _wait('the dashboard showing the wait to retry',
                          lambda: _dashboard_waiting(dashboard, task_id), 60)
            assert shown['name'].startswith(f'progress/{message}: waiting to retry, '), shown
            assert 10 <= shown['progress'] < 100, shown
        # Several waits, and still one open event, never an ended one.
        attempts = _task(cluster, task_id)['attempts']
        _wait('another attempt', lambda: _waiting(cluster, task_id)
              and _task(cluster, task_id)['attempts'] > attempts, 60)
        source.status = 0
        assert cluster.task_end(task_id, timeout=120).returncode == 0
        end = _one_end(cluster, task_id, failed=False)
        assert end['message'] == message
        _dashboard_end(dashboard, task_id, message, success=True)
    finally:
        source.status = 0
        _abort(cluster, image)


@pytest.mark.parametrize('when', ['running', 'waiting'])
def test_a_cancel_fails_the_event_saying_cancelled(
        cluster: Cluster, source: Source, quick: None, dashboard: Optional[Dashboard],
        when: str) -> None:
    image = _prepare(cluster, source, f'cancel-{when}')
    try:
        if when == 'waiting':
            source.status = 503
        task_id, message = _execute(cluster, image)
        if when == 'waiting':
            _wait('the wait to retry', lambda: _waiting(cluster, task_id), 60)
        else:
            cluster.task_running(task_id, past=0.05, timeout=60)
        cluster.ceph('rbd', 'migration', 'task', 'cancel', task_id)
        assert cluster.task_end(task_id, timeout=30).returncode == errno.ECANCELED
        end = _one_end(cluster, task_id, failed=True)
        assert end['message'] == message
        assert end['failure_message'] == f'{message}: cancelled by request (task {task_id})'
        done = _dashboard_end(dashboard, task_id, message, success=False)
        if done is not None:
            assert done['exception']['detail'] == end['failure_message'], done
    finally:
        source.status = 0
        _abort(cluster, image)


def test_an_abort_of_the_image_fails_the_running_execute_event(
        cluster: Cluster, source: Source, quick: None) -> None:
    image = _prepare(cluster, source, 'abort')
    task_id, message = _execute(cluster, image)
    cluster.task_running(task_id, past=0.05, timeout=60)
    abort = str(cluster.ceph_json('rbd', 'migration', 'abort', image)['task']['id'])
    assert cluster.task_end(abort, timeout=60).returncode == 0
    end = _one_end(cluster, task_id, failed=True)
    assert 'cancelled' in end['failure_message'] and image in end['failure_message']
    aborted = _one_end(cluster, abort, failed=False)
    assert aborted['message'] == f'Aborting migration of {image}'


def test_a_failure_says_what_which_image_and_why(
        cluster: Cluster, source: Source, quick: None,
        dashboard: Optional[Dashboard]) -> None:
    image = _prepare(cluster, source, 'failed')
    try:
        source.status = 404
        task_id, message = _execute(cluster, image)
        r = cluster.task_end(task_id, timeout=60)
        assert r.returncode not in (0, errno.ECANCELED), r.stderr
        task = _task(cluster, task_id)
        assert task['state'] == 'failed' and task['attempts'] == 1, task
        end = _one_end(cluster, task_id, failed=True)
        assert end['message'] == message and image in message and 'http' in message
        assert end['failure_message'] == \
            f"{message}: failed (task {task_id}): {task['last_error']}"
        assert 'HTTP 404' in end['failure_message']
        _no_percent(end['message'], end['failure_message'])
        done = _dashboard_end(dashboard, task_id, message, success=False)
        if done is not None:
            assert done['exception']['detail'] == end['failure_message'], done
    finally:
        source.status = 0
        _abort(cluster, image)


def test_a_failover_opens_the_same_event_again(
        cluster: Cluster, source: Source, quick: None,
        dashboard: Optional[Dashboard]) -> None:
    """The source goes away (connection refused); the mgr is killed while
    the task waits to retry; the new mgr's event is the same one, open."""
    image = _prepare(cluster, source, 'failover')
    try:
        task_id, message = _execute(cluster, image)
        cluster.task_running(task_id, past=0.1, timeout=60)
        source.stop()
        before = _wait('the wait to retry', lambda: _waiting(cluster, task_id), 60)
        assert 'refused' in before['message'], before
        cluster.kill_daemon('mgr.x')
        cluster.start_daemon('mgr.x')
        cluster.wait_module()
        after = _wait('the event open again after the failover',
                      lambda: _waiting(cluster, task_id), 60)
        assert after['id'] == before['id'] and after['message'].startswith(message)
        _no_percent(after['message'])
        if dashboard is not None:
            _wait('the dashboard showing the wait to retry',
                  lambda: _dashboard_waiting(dashboard, task_id), 60)
        source.start()
        assert cluster.task_end(task_id, timeout=120).returncode == 0
        end = _one_end(cluster, task_id, failed=False)
        assert end['message'] == message
        _dashboard_end(dashboard, task_id, message, success=True)
    finally:
        if source.server is None:
            source.start()
        _abort(cluster, image)
