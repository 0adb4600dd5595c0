"""Every command answers in bounded time, and stop means stop.

The mgr serves this module's commands one at a time.  These tests hold one
command on a source that trickles, or on a frozen OSD, and check that the
others still answer within seconds, that the slow one says what it waits
on, and that a cancelled task ends, stays cancelled across a failover, and
never runs again.  Every wait is bounded; a frozen OSD is always resumed.
"""
import errno
import hashlib
import http.server
import json
import os
import signal
import socketserver
import subprocess
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List

import pytest

from qa.cluster import Cluster

IMAGE = 48 << 20
#: Names differ between runs: a run cut short leaves its images behind.
RUN = uuid.uuid4().hex[:6]
#: The source's bytes: each 64 KiB block holds its own number.
DATA = b''.join(n.to_bytes(4, 'little') * (16384) for n in range(IMAGE >> 16))


class Source(http.server.BaseHTTPRequestHandler):
    """A raw image that serves ranges, or trickles, or hangs, on demand."""

    protocol_version = 'HTTP/1.1'
    mode: Dict[str, Any] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def _headers(self, status: int, length: int, extra: Dict[str, str]) -> None:
        self.send_response(status)
        self.send_header('Content-Length', str(length))
        self.send_header('Accept-Ranges', 'bytes')
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._stall()
        self._headers(200, self.mode.get('claimed', IMAGE), {})

    def do_GET(self) -> None:
        self._stall()
        if self.mode.get('delay'):
            self.mode['stop'].wait(self.mode['delay'])
        first, last = (int(x) for x in self.headers['Range'][6:].split('-'))
        if first >= IMAGE:
            self._headers(416, 0, {'Content-Range': f'bytes */{IMAGE}'})
            return
        last = min(last, IMAGE - 1)
        body = DATA[first:last + 1]
        claimed = self.mode.get('claimed', IMAGE)
        self._headers(206, len(body), {'Content-Range': f'bytes {first}-{last}/{claimed}'})
        if self.mode.get('trickle'):
            for n in range(len(body)):
                if self.mode['stop'].wait(0.2):
                    return
                self.wfile.write(body[n:n + 1])
                self.wfile.flush()
        else:
            self.wfile.write(body)

    def _stall(self) -> None:
        hang: threading.Event = self.mode['hang']
        if hang.is_set():
            self.mode['stop'].wait(120)


@pytest.fixture
def source() -> Iterator[Dict[str, Any]]:
    mode: Dict[str, Any] = {'hang': threading.Event(), 'stop': threading.Event(),
                            'trickle': False}
    handler = type('Handler', (Source,), {'mode': mode})
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mode['url'] = f'http://127.0.0.1:{server.server_address[1]}/disk.raw'
    yield mode
    mode['stop'].set()
    server.shutdown()
    server.server_close()


def _spec(url: str, engine: str = 'adapter') -> str:
    return json.dumps({'type': 'raw', 'stream': {'type': 'http', 'url': url},
                       'rbd_migration': {'engine': engine}})


def _timed(cluster: Cluster, *args: str) -> float:
    """Seconds one CLI command takes to answer, whatever it answers."""
    assert cluster.state
    began = time.monotonic()
    subprocess.run(['ceph', '--conf', cluster.state.conf, *args],
                   capture_output=True, text=True, timeout=60)
    return time.monotonic() - began


def _once(cluster: Cluster, *args: str) -> Any:
    """One CLI call, not repeated on EINPROGRESS."""
    assert cluster.state
    return subprocess.run(['ceph', '--conf', cluster.state.conf, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def short_probe(cluster: Cluster) -> Iterator[None]:
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/probe_timeout', '6')
    yield
    cluster.reset_module_option('probe_timeout')


def test_a_trickling_prepare_holds_no_other_command(cluster: Cluster, source: Dict[str, Any],
                                                    short_probe: None) -> None:
    source['trickle'] = True
    began = time.monotonic()
    r = _once(cluster, 'rbd', 'migration', 'prepare', '--import-only', f'rbd/trickled-{RUN}',
              '--source-spec', _spec(source['url']))
    assert time.monotonic() - began < 5
    assert r.returncode == errno.EINPROGRESS, r.stderr
    assert f'prepare rbd/trickled-{RUN} is still running' in r.stderr
    assert 'waiting on the source, raw over http' in r.stderr
    # Meanwhile the other commands answer.
    for command in (['rbd', 'migration', 'task', 'list'], ['rbd', 'migration', 'status']):
        assert _timed(cluster, *command) < 3
    status = cluster.ceph('rbd', 'migration', 'status')
    assert f'commands still running:\n  prepare rbd/trickled-{RUN}' in status
    # The probe's overall deadline ends it; the repeated command answers.
    end = cluster.run_ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/trickled-{RUN}',
                           '--source-spec', _spec(source['url']), timeout=30)
    assert end.returncode == errno.ETIMEDOUT, end.stderr
    assert 'probe_timeout 6 s' in end.stderr and end.stderr.strip().count('\n') == 0
    assert f'trickled-{RUN}' not in cluster.rbd('ls', 'rbd').split()
    assert f'trickled-{RUN}' not in cluster.rbd('trash', 'ls', '--all', 'rbd')


def _osd_pids(cluster: Cluster) -> List[int]:
    return [pid for name, pid in cluster.pids().items() if name.startswith('osd.')]


def test_status_answers_during_a_frozen_osd_naming_the_pool(cluster: Cluster) -> None:
    cluster.rbd('create', '--size', '16M', f'rbd/frozen-src-{RUN}')
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/frozen-src-{RUN}', f'rbd2/frozen-dst-{RUN}')
    frozen = _osd_pids(cluster)[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        time.sleep(1)
        times = [_timed(cluster, 'rbd', 'migration', 'status') for _ in range(3)]
        times.append(_timed(cluster, 'rbd', 'migration', 'task', 'list'))
        status = _once(cluster, 'rbd', 'migration', 'status', '--format', 'json')
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert max(times) < 4, times
    answer = json.loads(status.stdout)
    # Either the scan got past the frozen OSD's PGs, or status says which
    # pool it still waits on.
    waiting = answer['listed'].get('waiting_on', [])
    assert all(w.startswith('pool ') for w in waiting), waiting
    # Once the OSD is back the listing is whole again.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = cluster.ceph_json('rbd', 'migration', 'status')
        if not answer['listed'].get('waiting_on') and any(
                m['dest']['name'] == f'frozen-dst-{RUN}' for m in answer['migrations']):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f'status still incomplete after the OSD resumed: {answer}')
    task = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd2/frozen-dst-{RUN}')['task']
    assert cluster.task_end(str(task['id'])).returncode == 0


def test_a_cancel_ends_a_read_the_source_never_answers(cluster: Cluster,
                                                       source: Dict[str, Any]) -> None:
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/hung-{RUN}',
                 '--source-spec', _spec(source['url']))
    source['hang'].set()  # every request from now on waits for ever
    task = str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/hung-{RUN}')['task']['id'])
    deadline = time.monotonic() + 30
    while cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks'][-1]['state'] \
            != 'running' and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    began = time.monotonic()
    cluster.ceph('rbd', 'migration', 'task', 'cancel', task)
    end = cluster.task_end(task, timeout=30)
    assert time.monotonic() - began < 10
    assert end.returncode == errno.ECANCELED, end.stderr
    source['hang'].clear()
    abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/hung-{RUN}')['task']
    assert cluster.task_end(str(abort['id'])).returncode == 0


def test_a_cancel_survives_a_failover(cluster: Cluster, source: Dict[str, Any]) -> None:
    """The cancel is kept with the task: a mgr killed right after it does
    not run the task again."""
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/cancelled-{RUN}',
                 '--source-spec', _spec(source['url']))
    source['hang'].set()
    task = str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/cancelled-{RUN}')['task']['id'])
    cluster.task_running(task, past=-1.0, timeout=30)
    cluster.ceph('rbd', 'migration', 'task', 'cancel', task)
    cluster.kill_daemon('mgr.x')
    source['hang'].clear()
    cluster.start_daemon('mgr.x')
    cluster.wait_module()
    end = cluster.task_end(task, timeout=60)
    assert end.returncode == errno.ECANCELED, end.stderr
    record = next(t for t in cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
                  if t['id'] == task)
    assert record['attempts'] == 1 and record['state'] == 'cancelled'
    abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/cancelled-{RUN}')['task']
    assert cluster.task_end(str(abort['id'])).returncode == 0


@pytest.mark.parametrize('key', ['mgr/rbd_migration/anything', 'rbd/mirror/peer/x',
                                 'config/mgr/mgr/dashboard/key', 'elsewhere/secret'])
def test_config_refs_outside_the_allowed_prefixes_are_refused(cluster: Cluster,
                                                              key: str) -> None:
    spec = {'type': 'raw', 'stream': {'type': 's3', 'url': 'http://127.0.0.1:9/b/k',
                                      'access_key': f'config://{key}',
                                      'secret_key': 'x' * 8}}
    r = cluster.run_ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/cfg-{RUN}',
                         '--source-spec', json.dumps(spec))
    assert r.returncode == errno.EPERM, r.stderr
    line = r.stderr.strip()
    assert line.count('\n') == 0 and 'Traceback' not in line
    assert f"source-spec: stream.access_key: config-key '{key}' is not one" in line
    assert 'config_key_prefixes: rbd/' in line
    assert f'cfg-{RUN}' not in cluster.rbd('ls', 'rbd').split()


def _children(cluster: Cluster) -> List[str]:
    """This cluster's mgr's execute children (other test workers' clusters
    run theirs meanwhile)."""
    r = subprocess.run(['pgrep', '-af', '-P', str(cluster.pids()['mgr.x']),
                        'rbd_migration.engine.isolated'], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if 'pgrep' not in line]


def test_a_prepare_starts_the_execute_child_ahead(cluster: Cluster,
                                                  source: Dict[str, Any]) -> None:
    """A new active mgr keeps no spare child until asked; a prepare that
    librbd executes starts one, for its execute to take."""
    cluster.ceph('mgr', 'fail')
    cluster.wait_module()
    assert not _children(cluster)
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/ahead-{RUN}',
                 '--source-spec', _spec(source['url'], 'librbd'))
    try:
        cluster._wait('a spare execute child', lambda: len(_children(cluster)) == 1, 30)
    finally:
        abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/ahead-{RUN}')['task']
        assert cluster.task_end(str(abort['id'])).returncode == 0


def test_a_librbd_execute_stops_on_cancel_and_resumes(cluster: Cluster,
                                                     source: Dict[str, Any]) -> None:
    """librbd ignores a cancel; its execute runs in a child the module kills."""
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/isolated-{RUN}',
                 '--source-spec', _spec(source['url'], 'librbd'))
    source['delay'] = 0.3
    task = str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/isolated-{RUN}')['task']['id'])
    cluster.task_running(task, past=0.05, timeout=60)
    during = set(_children(cluster))    # the execute's, and a spare for the next task
    assert 1 <= len(during) <= 2, during
    began = time.monotonic()
    cluster.ceph('rbd', 'migration', 'task', 'cancel', task)
    end = cluster.task_end(task, timeout=30)
    assert time.monotonic() - began < 10
    assert end.returncode == errno.ECANCELED, end.stderr
    after = set(_children(cluster))     # the spare at most, never the execute's
    assert len(after) <= 1 and len(during - after) == 1, (during, after)
    # librbd's execute, run again, completes the copy from the source.
    source['delay'] = 0
    again = str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/isolated-{RUN}')['task']['id'])
    assert cluster.task_end(again, timeout=120).returncode == 0
    assert cluster.image_sha(f'rbd/isolated-{RUN}') == hashlib.sha256(DATA).hexdigest()
    abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/isolated-{RUN}')['task']
    assert cluster.task_end(str(abort['id'])).returncode == 0


def test_a_lying_content_length_is_refused_at_prepare(cluster: Cluster,
                                                      source: Dict[str, Any]) -> None:
    source['claimed'] = IMAGE + (1 << 20)
    r = cluster.run_ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/liar-{RUN}',
                         '--source-spec', _spec(source['url'], 'auto'))
    assert r.returncode == errno.EINVAL, r.stderr
    line = r.stderr.strip()
    assert line.count('\n') == 0 and 'does not serve the last of them' in line
    assert f'liar-{RUN}' not in cluster.rbd('ls', 'rbd').split()


def _blocklist(cluster: Cluster, which: str) -> str:
    addr = cluster.ceph_json('rbd', 'migration', 'metrics')['clients'][which]
    cluster.ceph('osd', 'blocklist', 'add', addr)
    return addr


def test_blocklisted_clients_are_replaced(cluster: Cluster, source: Dict[str, Any]) -> None:
    """As rbd_support does: a client another one blocklisted (breaking an
    image lock it held) fails every call; the module replaces it and the
    commands and tasks that failed on it succeed when run again."""
    name = f'rbd/blocklisted-{RUN}'
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', name,
                 '--source-spec', _spec(source['url']))
    old = _blocklist(cluster, 'commands')
    try:
        deadline = time.monotonic() + 60
        answers = []
        while time.monotonic() < deadline:
            # An image no record names, so that the answer must come from
            # RADOS (a listing or an adapter record may answer without it).
            # Until the OSDs have the new map the old client still works.
            r = cluster.run_ceph('rbd', 'migration', 'status', f'rbd/nowhere-{RUN}')
            answers.append((r.returncode, r.stderr.strip()))
            if r.returncode != errno.EAGAIN and errno.EAGAIN in [a[0] for a in answers]:
                break
            time.sleep(0.5)
        assert answers[-1][0] == errno.ENOENT, answers
        assert [a[0] for a in answers].count(errno.EAGAIN) <= 2, answers
        clients = cluster.ceph_json('rbd', 'migration', 'metrics')['clients']
        assert clients['commands'] != old
        old_tasks = _blocklist(cluster, 'tasks')
        cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/retry_backoff', '1')
        task = str(cluster.ceph_json('rbd', 'migration', 'execute', name)['task']['id'])
        assert cluster.task_end(task, timeout=120).returncode == 0
        assert cluster.ceph_json('rbd', 'migration', 'metrics')['clients']['tasks'] != old_tasks
        commit = str(cluster.ceph_json('rbd', 'migration', 'commit', name)['task']['id'])
        assert cluster.task_end(commit).returncode == 0
        assert cluster.image_sha(name) == hashlib.sha256(DATA).hexdigest()
    finally:
        cluster.reset_module_option('retry_backoff')
        for addr in (old, locals().get('old_tasks')):
            if addr:
                cluster.run_ceph('osd', 'blocklist', 'rm', str(addr))
        abort = cluster.run_ceph('rbd', 'migration', 'abort', name, '-f', 'json')
        if abort.returncode == 0:
            cluster.task_end(str(json.loads(abort.stdout)['task']['id']))
        subprocess.run(['rbd', '--conf', str(cluster.state.conf if cluster.state else ''),
                        'rm', '--no-progress', name], capture_output=True)


def test_a_target_a_failover_left_unrecorded_is_removed(cluster: Cluster) -> None:
    """A prepare cut between creating its private target and recording it
    leaves an image no command finds; the next mgr removes it (one in the
    trash, one not yet moved there), and leaves recorded ones alone."""
    orphans = [f'rbd_migration.{uuid.uuid4().hex[:12]}' for _ in range(2)]
    for name in orphans:
        cluster.rbd('create', '--size', '8M', f'rbd/{name}')
    cluster.rbd('trash', 'mv', f'rbd/{orphans[0]}')
    time.sleep(1.5)  # created before the next mgr starts, by its clock too
    cluster.kill_daemon('mgr.x')
    cluster.start_daemon('mgr.x')
    cluster.wait_module()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [n for n in orphans if n in cluster.rbd('ls', 'rbd')
                or n in cluster.rbd('trash', 'ls', '--all', 'rbd')]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f'still there: {left}'
