"""Plain-text answers for people; ``-f json`` gives the same data whole."""
from typing import Any, Dict, List, Optional


def message(result: Dict[str, Any]) -> str:
    """Commands that queue a task or change a flag answer one sentence."""
    return str(result.get('message', ''))


def task_list(result: Dict[str, Any]) -> str:
    return _tasks(result['tasks']) or 'no tasks'


def batch_status(result: Dict[str, Any]) -> str:
    """One batch image by image, or every batch on a line."""
    if 'items' in result:
        return _batch(result)
    return '\n'.join(_batch_line(b) for b in result['batches']) or 'no batches'


def _image(ref: Optional[Dict[str, Any]]) -> str:
    if not ref:
        return '-'
    ns = f"{ref['namespace']}/" if ref['namespace'] else ''
    return f"{ref['pool']}/{ns}{ref['name']} (id {ref['id']})"


def migration(m: Dict[str, Any]) -> str:
    if m['import_only']:
        source = 'import of ' + _spec(m.get('source_spec'))
    else:
        source = _image(m['source'])
    lines = [f"{_image(m['dest'])}",
             f'  source: {source}',
             f"  state: {m['state_text']}"]
    if m.get('path'):
        lines.append(f"  path: {m['path']}")
    task = m.get('task')
    if task:
        lines.append(f'  task: {_task_line(task)}')
    return '\n'.join(lines)


def _spec(spec: Optional[Dict[str, Any]]) -> str:
    if not spec:
        return 'an external source'
    from .source_spec import spec_summary
    return spec_summary(spec)


def status(result: Dict[str, Any]) -> str:
    parts = [migration(m) for m in result['migrations']] or ['no migrations']
    tasks = _tasks(result['tasks'])
    if tasks:
        parts.append('tasks:\n' + tasks)
    endpoint = result.get('live_endpoint') or {}
    if endpoint.get('views'):
        parts.append(f"live endpoint: {endpoint['views']} view(s) served, "
                     f"{endpoint['requests']} requests, {endpoint['errors']} errors")
    elif endpoint and not endpoint.get('listening'):
        parts.append(f"live endpoint: not listening ({endpoint.get('why')})")
    listed = result.get('listed') or {}
    age = listed.get('age', 0.0)
    waits = ', '.join(listed.get('waiting_on') or [])
    if listed.get('stale'):
        if not listed.get('at'):
            parts = [_status_pending(waits)] + parts[1:] if not result['migrations'] \
                else parts
        else:
            parts.append(f'(migrations as listed {age:.0f} s ago: a newer listing is '
                         f"still under way{', waiting on ' + waits if waits else ''}"
                         f"{'; ceph health detail may say why' if waits else ''})")
    elif age >= 1.0:  # answered from the listing kept while tasks run
        parts.append(f'(migrations as listed {age:.0f} s ago; tasks are running)')
    commands = result.get('commands') or []
    if commands:
        parts.append('commands still running:\n' + '\n'.join(
            f"  {c['command']} ({c['seconds']:.0f} s"
            + (f", waiting on {c['waiting_on']})" if c.get('waiting_on') else ')')
            for c in commands))
    return '\n\n'.join(parts)


def _status_pending(waits: str) -> str:
    return ('migrations: not listed yet, the listing is still under way'
            f"{' (waiting on ' + waits + ')' if waits else ''}; ask again")


def _task_line(t: Dict[str, Any]) -> str:
    line = (f"{t['id']} {t['action']} {t['image_spec']}: {t['state']}"
            f", attempt {t['attempts']}")
    if t['state'] == 'running':
        line += f", {t['progress']:.0%}"
        if t.get('stalled'):
            line += f", stalled: {t['stalled']}"
    if t.get('last_error') and t['state'] != 'completed':
        line += f", last error: {t['last_error']}"
    return line


def _tasks(tasks: List[Dict[str, Any]]) -> str:
    return '\n'.join('  ' + _task_line(t) for t in tasks)


def _size(n: Optional[int]) -> str:
    if n is None:
        return '?'
    value = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if value < 1024 or unit == 'TiB':
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    return f'{n} B'


def plan(result: Dict[str, Any]) -> str:
    lines = [f"{result['source']} -> {result['dest']}: {result['to_migrate']} image(s), "
             f"{_size(result['bytes'])} to migrate, {result['to_skip']} skipped"]
    for i in result['plan']:
        what = f"{i['order']:>4}. {i['image']} -> {i['target']}"
        if i['action'] == 'skip':
            lines.append(f"{what}: SKIP: {i['reason']}")
            continue
        extra = [_size(i['size']), f"{i['snapshots']} snapshot(s)"]
        if i['parent']:
            extra.append(f"clone of {i['parent']}"
                         + (f" (after {i['after']})" if i['after'] else ''))
        if i['clones']:
            extra.append(f"{len(i['clones'])} clone(s): {', '.join(i['clones'])}")
        extra.append(f"commit {i['commit']}")
        lines.append(f"{what}: {', '.join(extra)}")
    if 'batch' in result:
        lines.append(result['message'])
    else:
        lines.append(result.get('message', ''))
    return '\n'.join(lines)


def _batch_line(b: Dict[str, Any]) -> str:
    counts = ', '.join(f'{n} {state}' for state, n in sorted(b['counts'].items()))
    return (f"{b['id']} {b['source_pool']}{'/' + b['source_namespace'] if b['source_namespace'] else ''}"
            f" -> {b['dest_pool']}{'/' + b['dest_namespace'] if b['dest_namespace'] else ''}: "
            f"{b['state']}, {b['progress']:.0%} of {_size(b['bytes_total'])} ({counts})")


def _batch(result: Dict[str, Any]) -> str:
    lines = [_batch_line(result['batch'])]
    for i in result['items']:
        line = f"  {i['index'] + 1:>4}. {i['image']} -> {i['target']}: {i['state']}"
        task = i.get('task')
        if task and task['state'] in ('queued', 'running', 'waiting to retry'):
            line += f" ({task['action']} task {task['id']} {task['state']}, {task['progress']:.0%})"
        if i.get('waiting'):
            line += f" (waiting: {i['waiting']})"
        if i.get('reason'):
            line += f": {i['reason']}"
        lines.append(line)
    return '\n'.join(lines)


def metrics(m: Dict[str, Any]) -> str:
    lines = [f"tasks: {m['running']} running, {m['queued']} queued, {m['failed']} failed; "
             f"copying {_size(int(m['rate_bytes_per_sec']))}/s"]
    for t in m['running_tasks']:
        lines.append(f"  {t['id']} {t['action']} {t['image_spec']}: "
                     f"{_size(t['bytes_done'])} of {_size(t['bytes_total'])}, "
                     f"{_size(int(t['rate_bytes_per_sec']))}/s")
    for task_id, why in sorted(m['waiting'].items()):
        lines.append(f'  {task_id} waits: {why}')
    for b in m['batches']:
        lines.append(f"  batch {b['id']}: {b['state']}, {b['progress']:.0%}")
    return '\n'.join(lines)
