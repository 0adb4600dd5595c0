"""Health checks derived from the task queue."""
from typing import Any, Dict, List, Optional

from .tasks import FAILED, RUNNING, Task

FAILED_CHECK = 'RBD_MIGRATION_FAILED'
STALLED_CHECK = 'RBD_MIGRATION_STALLED'


def health_checks(tasks: List[Task],
                  other_failures: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    """``RBD_MIGRATION_FAILED`` while a failed task is the latest word on its
    image (a retry, commit or abort of that image supersedes it);
    ``RBD_MIGRATION_STALLED`` while a running task has not moved for a
    while, with the reason when one is known."""
    failed = [t for t in tasks if t.state == FAILED and not t.superseded]
    stalled = [t for t in tasks if t.state == RUNNING and t.stalled]
    checks = {
        FAILED_CHECK: _check('failed', [
            f'{t.action} of {t.image_spec} failed (task {t.id}): {t.last_error}; '
            'retry it or abort the migration' for t in failed] + list(other_failures or [])),
        STALLED_CHECK: _check('make no progress', [
            f'{t.action} of {t.image_spec} (task {t.id}) is stalled at '
            f'{t.progress:.0%}: {t.stalled}' for t in stalled]),
    }
    return {name: check for name, check in checks.items() if check['count']}


def _check(what: str, detail: List[str]) -> Dict[str, Any]:
    return {'severity': 'warning', 'summary': f'{len(detail)} rbd migration task(s) {what}',
            'count': len(detail), 'detail': detail}
