"""The module's options, typed and read in one go.

The mgr hands option values out one name at a time; read here into one
frozen snapshot, each with its type, so a scheduling pass or a command sees
one consistent set of values (an operator may change any of them at run
time) and no caller casts.  The defaults are module.py's; a unit test keeps
the two equal.
"""
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, cast

from .context import REMOTE_CONF_DIR
from .errors import InvalidArgument
from .limits import SourceLimits

#: How the mgr gives out an option's current value.
OptionGetter = Callable[[str], Any]

#: Where config:// references may point by default: keys operators keep
#: for rbd, except rbd-mirror's (the service refuses those whatever this says).
DEFAULT_CONFIG_KEY_PREFIXES = 'rbd/'


@dataclass
class RetryPolicy:
    """How often and how far apart a task's transient failures are retried."""

    max_attempts: int = 8
    backoff: float = 5.0        # seconds before the first retry
    max_backoff: float = 300.0

    def delay(self, attempts: int) -> float:
        return float(min(self.max_backoff, self.backoff * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Settings:
    max_concurrent_tasks: int = 2
    max_concurrent_executes_per_pool: int = 0
    max_bandwidth_mbps: float = 0.0
    execute_window: str = ''
    retry_max_attempts: int = 8
    retry_backoff: float = 5.0
    retry_max_backoff: float = 300.0
    stall_warning_after: float = 300.0
    adapter_concurrency: int = 8
    adapter_bandwidth_mbps: float = 0.0
    keep_copy_buffers: bool = False
    status_max_age: float = 2.0
    file_source_roots: str = ''
    config_key_prefixes: str = DEFAULT_CONFIG_KEY_PREFIXES
    http_redirect_origins: str = ''
    remote_cluster_conf_dir: str = REMOTE_CONF_DIR
    command_wait: float = 1.0
    probe_timeout: float = 60.0
    source_max_metadata_bytes: int = SourceLimits.metadata_bytes
    source_max_snapshots: int = SourceLimits.snapshots
    source_max_records: int = SourceLimits.records
    source_max_chain_depth: int = SourceLimits.chain_depth
    live_imports: bool = True
    live_copy_by_module: bool = True
    live_endpoint_address: str = ''
    live_endpoint_port: int = 9290

    @classmethod
    def read(cls, option: OptionGetter) -> 'Settings':
        """Every option's current value, cast to its type (None: the default)."""
        values: Dict[str, Any] = {}
        for f in fields(cls):
            raw = option(f.name)
            kind = cast(Callable[[Any], Any], f.type)  # int, float, str or bool
            values[f.name] = f.default if raw is None else kind(raw)
        return cls(**values)

    @property
    def file_roots(self) -> List[str]:
        return [p for p in self.file_source_roots.split(':') if p]

    @property
    def key_prefixes(self) -> List[str]:
        return [p for p in self.config_key_prefixes.split(':') if p]

    @property
    def redirect_origins(self) -> List[str]:
        return self.http_redirect_origins.split()

    @property
    def remote_conf_dir(self) -> str:
        """``remote_cluster_conf_dir``, which must be absolute: the mgr's
        working directory is nobody's idea of where a conf lies."""
        path = self.remote_cluster_conf_dir
        if not os.path.isabs(path):
            raise InvalidArgument(
                f'remote_cluster_conf_dir: {path!r} is not an absolute path; set it to '
                'the directory holding the other clusters\' <name>.conf and keyrings: '
                '`ceph config set mgr mgr/rbd_migration/remote_cluster_conf_dir /etc/ceph`')
        return path

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_max_attempts, self.retry_backoff,
                           self.retry_max_backoff)

    @property
    def source_limits(self) -> SourceLimits:
        return SourceLimits(**{f.name: getattr(self, SourceLimits.option_name(f.name))
                               for f in fields(SourceLimits)})
