#!/usr/bin/python3
"""Screenshots of the dashboard's Tasks and Notifications panel while an
import runs, waits to retry, completes, and while another one fails.

    qa/dashboard_shots.py [--dir DIR] [--out docs/images] [--keep]

Brings up a cluster with qa/cluster.py in DIR (or reuses the one running
there), enables the dashboard, serves two raw images over HTTP from this
process, imports them with the adapter engine (throttled so that the
import takes a while) and drives headless Chromium over the DevTools
protocol: it logs in through the login form, opens the panel and takes a
PNG at each step.  Installs Debian's chromium and python3-websocket if they
are missing.  A cluster it started is stopped at the end unless --keep.
"""
import argparse
import base64
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qa.cluster import Cluster, free_port, log  # noqa: E402

CHROMIUM = '/usr/bin/chromium'
USER, PASSWORD = 'rbdmigration-shots', 'Rbd-Migration-Shots-1'
IMAGE = 64 << 20
DATA = b''.join(n.to_bytes(4, 'little') * 16384 for n in range(IMAGE >> 16))
#: What the shots need of the module: a slow copy, one long wait to retry.
OPTIONS = {'adapter_bandwidth_mbps': '2', 'adapter_concurrency': '1',
           'retry_backoff': '45', 'retry_max_backoff': '45', 'retry_max_attempts': '8'}


def ensure_packages() -> None:
    missing = [pkg for pkg, probe in (('chromium', CHROMIUM),
                                      ('python3-websocket',
                                       '/usr/lib/python3/dist-packages/websocket'))
               if not os.path.exists(probe)]
    if missing:
        log(f'installing {" ".join(missing)}')
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        subprocess.run(['apt-get', 'install', '-y', '-q', '--no-install-recommends',
                        *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out waiting for {what}')
        time.sleep(interval)


# -- the source --------------------------------------------------------------------

class Source:
    """Raw images over HTTP on 127.0.0.1; ``status[path]`` set to an HTTP
    status makes that path answer it instead of the image."""

    def __init__(self) -> None:
        self.status: Dict[str, int] = {}
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.0'

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

            def _answer(self, body: bool) -> None:
                status = source.status.get(self.path, 0)
                if status:
                    self.send_response(status)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                rng = self.headers.get('Range') if body else None
                first, last = 0, IMAGE - 1
                if rng:
                    a, b = rng[len('bytes='):].split('-')
                    first, last = int(a), min(int(b or last), last)
                self.send_response(206 if rng else 200)
                self.send_header('Accept-Ranges', 'bytes')
                self.send_header('Content-Length', str(last - first + 1))
                if rng:
                    self.send_header('Content-Range', f'bytes {first}-{last}/{IMAGE}')
                self.end_headers()
                if body:
                    self.wfile.write(DATA[first:last + 1])

        self.server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}{path}'

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the browser -------------------------------------------------------------------

class Browser:
    """Headless Chromium driven over the DevTools protocol: the dashboard
    keeps its login in a cookie and local storage, which a plain
    ``--screenshot`` run cannot fill."""

    def __init__(self, width: int = 1400, height: int = 900) -> None:
        import websocket  # Debian's python3-websocket
        self.profile = tempfile.mkdtemp(prefix='rbd-migration-shots-')
        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
             '--no-first-run', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--hide-scrollbars',
             f'--user-data-dir={self.profile}', f'--window-size={width},{height}',
             f'--remote-debugging-port={port}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = wait('Chromium\'s DevTools', lambda: self._page(port), 30)
        self.ws = websocket.create_connection(target, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.call('Page.enable')
        self.call('Emulation.setDeviceMetricsOverride', width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _page(port: int) -> Optional[str]:
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=2) as r:
                targets = json.loads(r.read())
        except OSError:
            return None
        return next((str(t['webSocketDebuggerUrl']) for t in targets
                     if t.get('type') == 'page'), None)

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get('id') == self.next_id:
                if 'error' in message:
                    raise RuntimeError(f'{method}: {message["error"]}')
                result: Dict[str, Any] = message.get('result', {})
                return result

    def js(self, expression: str) -> Any:
        answer = self.call('Runtime.evaluate', expression=expression, returnByValue=True,
                           awaitPromise=True)
        if 'exceptionDetails' in answer:
            raise RuntimeError(f'{expression[:60]}: {answer["exceptionDetails"]}')
        return answer['result'].get('value')

    def wait_js(self, what: str, expression: str, timeout: float = 60) -> Any:
        return wait(what, lambda: self.js(expression), timeout)

    def card(self, kind: str, *texts: str, timeout: float = 60) -> None:
        """Wait for a card of the panel (``task``: a running one,
        ``notification``: a finished one) that shows every one of ``texts``."""
        self.wait_js(f'a {kind} card showing {texts}', f"""
            [...document.querySelectorAll('.tc_{kind}')].some(
                c => {json.dumps(list(texts))}.every(t => c.innerText.includes(t)))""",
                     timeout)

    def no_card(self, kind: str, text: str, timeout: float = 60) -> None:
        self.wait_js(f'no {kind} card showing {text!r}', f"""
            ![...document.querySelectorAll('.tc_{kind}')].some(
                c => c.innerText.includes({json.dumps(text)}))""", timeout)

    def screenshot(self, path: str) -> None:
        time.sleep(1)  # animations (the sidebar slides in, bars grow) settle
        data = self.call('Page.captureScreenshot', format='png')['data']
        with open(path, 'wb') as f:
            f.write(base64.b64decode(data))
        log(f'wrote {path}')

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def log_in(browser: Browser, url: str) -> None:
    """Through the login form, as a person would."""
    browser.call('Page.navigate', url=url.rstrip('/') + '/#/login')
    browser.wait_js('the login form', "!!document.getElementById('username')")
    browser.js(f"""(() => {{
        const set = (id, value) => {{
            const e = document.getElementById(id);
            e.value = value;
            e.dispatchEvent(new Event('input', {{bubbles: true}}));
        }};
        // The telemetry banner says nothing about migrations: out of the shots.
        localStorage.setItem('telemetry_notification_hidden', 'true');
        set('username', {json.dumps(USER)});
        set('password', {json.dumps(PASSWORD)});
        document.querySelector('input[type=submit]').click();
        return true;
    }})()""")
    browser.wait_js('the dashboard after login', "location.hash.startsWith('#/dashboard')")
    browser.wait_js('the notifications button', "!!document.querySelector('cd-notifications a')")


def open_panel(browser: Browser) -> None:
    """The Tasks and Notifications sidebar, opened if it is closed."""
    browser.js("""(() => {
        const bar = document.querySelector('cd-notifications-sidebar');
        if (!bar || !bar.classList.contains('active'))
            document.querySelector('cd-notifications a').click();
        return true;
    })()""")


# -- the story ---------------------------------------------------------------------

@contextmanager
def module_options(cluster: Cluster) -> Iterator[None]:
    for key, value in OPTIONS.items():
        cluster.ceph('config', 'set', 'mgr', f'mgr/rbd_migration/{key}', value)
    time.sleep(1)
    try:
        yield
    finally:
        for key in OPTIONS:
            cluster.reset_module_option(key)


def free_name(cluster: Cluster, base: str) -> str:
    taken = set(cluster.rbd('ls', 'rbd').split())
    return next(f'{base}-{n:02d}' for n in range(1, 100) if f'{base}-{n:02d}' not in taken)


def import_image(cluster: Cluster, source: Source, path: str, name: str) -> str:
    """Prepare and execute an adapter-engine import; the execute's task id."""
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'http', 'url': source.url(path)},
                       'rbd_migration': {'engine': 'adapter'}})
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '--source-spec', spec)
    return str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/{name}')['task']['id'])


def task_state(cluster: Cluster, task_id: str) -> Dict[str, Any]:
    tasks = cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
    found: Dict[str, Any] = next(t for t in tasks if str(t['id']) == task_id)
    return found


def shoot(cluster: Cluster, url: str, out: str) -> None:
    source = Source()
    browser = Browser()
    web = free_name(cluster, 'web')
    try:
        log_in(browser, url)
        open_panel(browser)
        with module_options(cluster):
            task = import_image(cluster, source, '/web.raw', web)
            wait('the import part-way', lambda: task_state(cluster, task)['progress'] >= 0.2, 120)
            browser.card('task', f'into rbd/{web}', ' %')
            browser.screenshot(os.path.join(out, 'dashboard-running.png'))

            source.status['/web.raw'] = 503
            wait('the wait to retry',
                 lambda: task_state(cluster, task)['state'] == 'waiting to retry', 120)
            browser.card('task', f'into rbd/{web}: waiting to retry, attempt 2/8')
            browser.screenshot(os.path.join(out, 'dashboard-retry-wait.png'))

            source.status.pop('/web.raw')
            wait('the import to complete',
                 lambda: task_state(cluster, task)['state'] == 'completed', 300)
            open_panel(browser)
            browser.card('notification', f'into rbd/{web}')
            browser.no_card('task', f'into rbd/{web}')
            browser.screenshot(os.path.join(out, 'dashboard-completed.png'))

            db = free_name(cluster, 'db')
            cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/adapter_bandwidth_mbps', '0')
            failing = import_image_failing(cluster, source, db)
            wait('the import to fail',
                 lambda: task_state(cluster, failing)['state'] == 'failed', 120)
            open_panel(browser)
            browser.card('notification', f'into rbd/{db}: failed', 'not found (HTTP 404)')
            browser.screenshot(os.path.join(out, 'dashboard-failed.png'))
            for name in (web, db):
                cluster.run_ceph('rbd', 'migration', 'abort', f'rbd/{name}')
    finally:
        browser.close()
        source.close()


def import_image_failing(cluster: Cluster, source: Source, name: str) -> str:
    """An import whose source answers at prepare, then 404 at execute."""
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'http',
                                                 'url': source.url('/db.raw')},
                       'rbd_migration': {'engine': 'adapter'}})
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '--source-spec', spec)
    source.status['/db.raw'] = 404
    return str(cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/{name}')['task']['id'])


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dir', default='/tmp/rbd-migration-shots',
                   help='the cluster directory (reused if a cluster runs there)')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'docs', 'images'))
    p.add_argument('--keep', action='store_true', help='leave a cluster it started running')
    args = p.parse_args(argv)
    ensure_packages()
    os.makedirs(args.out, exist_ok=True)
    cluster = Cluster(args.dir)
    started = not cluster.running()
    if started:
        cluster.start(osd_size=2 << 30)
    was_on = 'dashboard' in cluster.ceph_json('mgr', 'services')
    try:
        url = cluster.enable_dashboard(USER, PASSWORD)
        shoot(cluster, url, args.out)
    finally:
        cluster.ceph('dashboard', 'ac-user-delete', USER, check=False)
        if started and not args.keep:
            cluster.stop()
        elif not was_on:
            cluster.ceph('mgr', 'module', 'disable', 'dashboard', check=False)
    return 0


if __name__ == '__main__':
    sys.exit(main())
