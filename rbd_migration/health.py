"""Health checks derived from the task queue."""
from typing import Any, Dict, List

from .tasks import FAILED, Task

FAILED_CHECK = 'RBD_MIGRATION_FAILED'


def health_checks(tasks: List[Task]) -> Dict[str, Dict[str, Any]]:
    """``RBD_MIGRATION_FAILED`` while a failed task is the latest word on its
    image; a retry, commit or abort of that image supersedes it."""
    failed = [t for t in tasks if t.state == FAILED and not t.superseded]
    if not failed:
        return {}
    return {FAILED_CHECK: {
        'severity': 'warning',
        'summary': f'{len(failed)} rbd migration task(s) failed',
        'count': len(failed),
        'detail': [f'{t.action} of {t.image_spec} failed (task {t.id}): '
                   f'{t.last_error}; retry it or abort the migration'
                   for t in failed],
    }}
