"""Plain-text answers for people; ``-f json`` gives the same data whole."""
from typing import Any, Dict, List, Optional


def render(prefix: str, result: Dict[str, Any]) -> str:
    if 'migrations' in result:
        return _status(result)
    if prefix.endswith('task list'):
        return _tasks(result['tasks']) or 'no tasks'
    if prefix.endswith('prepare'):
        return _migration(result)
    return result.get('message', '')


def _image(ref: Optional[Dict[str, Any]]) -> str:
    if not ref:
        return '-'
    ns = f"{ref['namespace']}/" if ref['namespace'] else ''
    return f"{ref['pool']}/{ns}{ref['name']} (id {ref['id']})"


def _migration(m: Dict[str, Any]) -> str:
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


def _status(result: Dict[str, Any]) -> str:
    parts = [_migration(m) for m in result['migrations']] or ['no migrations']
    tasks = _tasks(result['tasks'])
    if tasks:
        parts.append('tasks:\n' + tasks)
    return '\n\n'.join(parts)


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
