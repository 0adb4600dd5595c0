"""``rbd-migration``: rbd migration's commands, run by the rbd_migration module.

    rbd-migration [migration] prepare|execute|commit|abort <rbd's arguments>

Takes exactly what ``rbd migration <command>`` takes (Ceph 16.2), blocks
until the module's task ends, prints rbd's progress line and messages and
exits with rbd's status.  ``--no-wait`` prints the task id and returns.
"""
import errno
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from .options import USAGE_STATUS, UsageError, general_from_env, parse, usage
from .session import (WORDING, Clock, Progress, RadosTransport, Reply, Transport, Wording,
                      ask, strerror, wait_task)
from .translate import Plan, Refused, plan

#: The shell's status for a command ended by Ctrl-C, as rbd's would be.
INTERRUPTED = 130
#: The most of a --source-spec-path read (rbd reads 4 KiB; specs with
#: several snapshots are longer).
MAX_SPEC = 1 << 20


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse(argv)
    except UsageError as e:
        print(f'rbd: {e}', file=sys.stderr)
        return USAGE_STATUS
    if parsed.help:
        sys.stdout.write(usage(parsed.command))
        return 0
    try:
        the_plan = plan(parsed, read_spec)
    except Refused as e:
        print(e.line, file=sys.stderr)
        return e.status
    for line in the_plan.warnings:
        print(line, file=sys.stderr)
    general = dict(general_from_env(os.environ.get('CEPH_ARGS', '')))
    general.update({k: v for k, v in parsed.values.items()
                    if k in ('conf', 'cluster', 'id', 'name', 'mon_host', 'keyfile',
                             'keyring')})
    return connected(the_plan, general)


def read_spec(path: str) -> bytes:
    """A ``--source-spec-path``; ``-`` is stdin."""
    if path == '-':
        return sys.stdin.buffer.read(MAX_SPEC)
    with open(path, 'rb') as f:
        return f.read(MAX_SPEC)


def connected(the_plan: Plan, general: Dict[str, str]) -> int:
    try:
        import rados
    except ImportError:
        print('rbd-migration: needs python3-rados (it comes with ceph-common); run it '
              'with the interpreter the ceph CLI uses (/usr/bin/python3)', file=sys.stderr)
        return errno.ENOPKG
    try:
        cluster = open_cluster(rados, general)
    except Refused as e:
        print(e.line, file=sys.stderr)
        return e.status
    try:
        default_pool = str(cluster.conf_get('rbd_default_pool') or 'rbd')
        return run(the_plan, RadosTransport(cluster), default_pool)
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        cluster.shutdown()


def open_cluster(rados: Any, general: Dict[str, str]) -> Any:
    """A connected librados client configured as rbd configures its own:
    the conf file (``-c`` or the default search path), ``CEPH_ARGS``,
    then the command line's options."""
    kwargs: Dict[str, Any] = {'clustername': general.get('cluster') or None}
    if general.get('name'):
        kwargs['name'] = general['name']
    elif general.get('id'):
        kwargs['rados_id'] = general['id']
    try:
        cluster = rados.Rados(**kwargs)
    except rados.Error as e:
        raise Refused(f'rbd: {e}', _errno(e))
    try:
        cluster.conf_read_file(general.get('conf') or None)
    except rados.Error:
        if general.get('conf'):
            raise Refused('global_init: unable to open config file from search list '
                          f"{general['conf']}", USAGE_STATUS)
        print('did not load config file, using default settings.', file=sys.stderr)
    cluster.conf_parse_env('CEPH_ARGS')
    for option in ('keyring', 'keyfile', 'mon_host'):
        if general.get(option):
            cluster.conf_set(option, general[option])
    try:
        cluster.connect()
    except rados.Error as e:
        raise Refused("rbd: couldn't connect to the cluster!", _errno(e))
    return cluster


def _errno(e: BaseException) -> int:
    return abs(int(getattr(e, 'errno', None) or errno.EIO))


def run(the_plan: Plan, transport: Transport, default_pool: str,
        clock: Optional[Clock] = None, err: Optional[TextIO] = None,
        out: Optional[TextIO] = None) -> int:
    """Ask the module, wait for its task, answer as rbd would."""
    err = err if err is not None else sys.stderr
    out = out if out is not None else sys.stdout
    cmd, inbuf = the_plan.command(default_pool)
    if the_plan.action == 'prepare':
        return _prepare(the_plan, transport, cmd, inbuf, clock, err)
    wording = WORDING[the_plan.action]
    progress = Progress(wording.progress, the_plan.progress and the_plan.wait, err)
    reply = ask(transport, cmd, inbuf, clock)
    if reply.status:
        return _failed(progress, wording, reply.message, reply.status, err)
    task, why = _task_of(reply)
    if task is None:
        return _failed(progress, wording, why, errno.EINVAL, err)
    if not the_plan.wait:
        print(task['id'], file=out)
        return 0
    progress.update(float(task.get('progress') or 0))
    try:
        final = wait_task(transport, str(task['id']), progress.update, clock)
    except KeyboardInterrupt:
        err.write(f"\nrbd-migration: interrupted; task {task['id']} goes on in the "
                  f"background (ceph rbd migration task get {task['id']})\n")
        raise
    if final.status:
        return _failed(progress, wording, final.message, final.status, err)
    progress.finish()
    return 0


def _prepare(the_plan: Plan, transport: Transport, cmd: Dict[str, Any], inbuf: bytes,
             clock: Optional[Clock], err: TextIO) -> int:
    """prepare has no task: the module answers when the target exists."""
    reply = ask(transport, cmd, inbuf, clock)
    if not reply.status:
        return 0
    wording = WORDING['import' if the_plan.import_only else 'prepare']
    return _failed(Progress('', False, err), wording, reply.message, reply.status, err)


def _task_of(reply: Reply) -> Tuple[Optional[Dict[str, Any]], str]:
    """The task an answer names, or why there is none.  An execute of an
    executed migration has none: rbd fails it with EINVAL, and so does
    this client (scripts test for it)."""
    try:
        answer = json.loads(reply.out)
    except ValueError:
        return None, f'unexpected answer from the module: {reply.out[:200]!r}'
    task = answer.get('task') if isinstance(answer, dict) else None
    if isinstance(task, dict) and task.get('id') is not None:
        return task, ''
    message = answer.get('message', '') if isinstance(answer, dict) else ''
    return None, str(message or 'the module started no task')


def _failed(progress: Progress, wording: Wording, reason: str, status: int,
            err: TextIO) -> int:
    """rbd's failure lines, with the module's one-line reason between them:
    ``...failed.``, the reason, ``rbd: migration failed: (22) Invalid
    argument``; the exit status is the errno."""
    progress.fail()
    for line in _lines(reason):
        err.write(f'rbd-migration: {line}\n')
    err.write(f'{wording.failed}: {strerror(status)}\n')
    err.flush()
    return status


def _lines(text: str) -> List[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


if __name__ == '__main__':
    sys.exit(main())
