"""The mgr-facing layer: commands, options, serve/shutdown.  Thin on purpose:
it parses, calls into the package and formats; the work lives below."""
import errno
import json
import threading
from typing import Any, List, Optional, Tuple

from mgr_module import CLIReadCommand, MgrModule, NotifyType, Option

HandlerResult = Tuple[int, str, str]


class Module(MgrModule):
    NOTIFY_TYPES: List[NotifyType] = []
    MODULE_OPTIONS = [
        Option('max_concurrent_tasks', type='int', default=2, min=1, max=64,
               desc='tasks (execute, commit, abort) run at once; at most one per image',
               runtime=True),
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()

    def serve(self) -> None:
        self.log.info('rbd_migration serving')
        self._stop.wait()

    def shutdown(self) -> None:
        self._stop.set()
        super().shutdown()

    @CLIReadCommand('rbd migration status')
    def status(self, image_spec: Optional[str] = None,
               format: str = 'plain') -> HandlerResult:
        """Show RBD image migrations and their tasks"""
        result: dict = {'migrations': [], 'tasks': []}
        if format in ('json', 'json-pretty'):
            return 0, json.dumps(result, indent=2 if format == 'json-pretty' else None), ''
        return 0, 'no migrations', ''
