"""Commands every cluster test sends the module, and what they expect of
its answers: ``mig`` must succeed with JSON, ``mig_refused`` must fail with
one clear line."""
import json
import subprocess
import time
from typing import Any, Dict, Optional, Tuple

from qa.cluster import Cluster

#: A task's states while it is not over.
ACTIVE = ('queued', 'running', 'waiting to retry')


def ceph_run(cluster: Cluster, *args: str, inbuf: Optional[str] = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    return cluster.run_ceph(*args, inbuf=inbuf, timeout=timeout)


def mig(cluster: Cluster, *args: str, inbuf: Optional[str] = None,
        timeout: float = 60) -> Dict[str, Any]:
    """``ceph rbd migration ARGS -f json``, which must succeed."""
    r = ceph_run(cluster, 'rbd', 'migration', *args, '-f', 'json', inbuf=inbuf,
                 timeout=timeout)
    assert r.returncode == 0, (f'ceph rbd migration {" ".join(args)}: exit '
                               f'{r.returncode}: {r.stderr.strip()}')
    return json.loads(r.stdout)


def mig_refused(cluster: Cluster, *args: str,
                inbuf: Optional[str] = None) -> Tuple[int, str]:
    """``ceph rbd migration ARGS``, which must fail with one clear line;
    returns (exit status, that line)."""
    r = ceph_run(cluster, 'rbd', 'migration', *args, '-f', 'json', inbuf=inbuf)
    what = f'ceph rbd migration {" ".join(args)}'
    assert r.returncode != 0, f'{what} succeeded: {r.stdout.strip()}'
    err = r.stderr.strip()
    assert err, f'{what}: exit {r.returncode} with nothing on stderr'
    assert len(err.splitlines()) == 1, f'{what}: more than one line:\n{err}'
    assert 'Traceback' not in err and 'internal error' not in err, f'{what}: {err}'
    assert r.stdout.strip() == '', f'{what}: failed but printed {r.stdout!r}'
    return r.returncode, err


def wait_module(cluster: Cluster, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = ceph_run(cluster, 'rbd', 'migration', 'status', '-f', 'json', timeout=10)
            if r.returncode == 0:
                json.loads(r.stdout)
                return
        except (subprocess.TimeoutExpired, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f'the module did not answer within {timeout}s of mgr fail')


def wait_task(cluster: Cluster, task: str, timeout: float = 120) -> None:
    """Until task ``task`` is over, which must be with success
    (``task get`` answers EAGAIN while it is active)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = ceph_run(cluster, 'rbd', 'migration', 'task', 'get', task)
        if r.returncode != 11:
            assert r.returncode == 0, r.stderr
            return
        time.sleep(0.3)
    raise AssertionError(f'task {task} did not finish in {timeout}s')
