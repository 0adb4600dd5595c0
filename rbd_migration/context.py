"""What opening a source needs from its surroundings.

Passed in explicitly so that streams and formats stay importable and
testable without a running mgr.

Besides where a source may be read from, the context carries when reading
must stop: an overall ``deadline`` (the probe's, so that a source trickling
a byte a second cannot hold a prepare for hours) and a ``stop`` event (set
by ``task cancel``, ``abort`` or the mgr's shutdown).  Streams call
``check()`` between the pieces of every read, use ``wait_for()`` as their
socket timeout and ``pause()`` between attempts, so either ends a read
within one network wait.
"""
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import Cancelled, PermissionDenied, TimedOut
from .limits import SourceLimits

#: Longest wait for a connection (TCP and TLS handshake).  The watchdog
#: that ends blocked reads on a stop only sees a socket once it is
#: connected, so this bounds how long a stop can wait on a connect to a
#: host that drops packets.  (Name resolution waits on the system
#: resolver: its own timeout and attempts, resolv.conf's options.)
CONNECT_LIMIT = 10.0
#: Where a ``native`` source's ``cluster_name`` finds its files unless the
#: ``remote_cluster_conf_dir`` option says otherwise (upstream's place).
REMOTE_CONF_DIR = '/etc/ceph'


#: Keys no source-spec may name, whatever ``config_key_prefixes`` says: the
#: mgr modules' own (this one's records and secrets among them), the
#: monitors' configuration and rbd-mirror's peer secrets.
NEVER_CONFIG_KEYS = ('mgr/', 'config/', 'config-history/', 'mon/', 'rbd/mirror/')


def config_key_reader(rados: Any, prefixes: Sequence[str]) -> Callable[[str], Optional[str]]:
    """What resolves a source-spec's config:// reference through ``rados``
    (the mgr's client, which may read every key, its own and the cluster's
    secrets among them; the client that wrote the spec may not): only keys
    under ``prefixes`` are read on its behalf."""
    def read(key: str) -> Optional[str]:
        if not any(key.startswith(p) for p in prefixes) or \
                any(key.startswith(p) for p in NEVER_CONFIG_KEYS):
            allowed = ', '.join(prefixes) or 'none'
            raise PermissionDenied(
                f"config-key '{key}' is not one the module reads for a source-spec "
                f'(config_key_prefixes: {allowed}); keep the secret under one of '
                'them (ceph config-key set rbd/<name> <secret>)')
        ret, out, _ = rados.mon_command(
            json.dumps({'prefix': 'config-key get', 'key': key}), b'', timeout=10)
        return out.decode() if ret == 0 else None
    return read


@dataclass
class SourceContext:
    #: Directories under which ``file`` streams may read; empty refuses all.
    allowed_file_roots: List[str] = field(default_factory=list)
    #: Resolves a ``config://<key>`` reference from the mon config-key store.
    config_key: Optional[Callable[[str], Optional[str]]] = None
    #: A connected ``rados.Rados`` for ``native`` sources.
    rados: Optional[Any] = None
    #: Where a ``native`` source's ``cluster_name`` finds ``<name>.conf`` and
    #: ``<name>.<client>.keyring`` (an absolute path).
    remote_conf_dir: str = REMOTE_CONF_DIR
    #: Longest wait for one request: connecting, and its whole answer (a
    #: server that trickles a body is cut off after this long too).
    timeout: float = 30.0
    #: Attempts for one read on a transient failure (connection error, 5xx).
    retries: int = 5
    #: Origins (``scheme://host[:port]``) besides a URL's own to which its
    #: redirects may lead; a redirect elsewhere is refused.
    redirect_origins: List[str] = field(default_factory=list)
    #: What the source's metadata may cost (memory, counts).
    limits: SourceLimits = field(default_factory=SourceLimits)
    #: ``time.monotonic()`` by which all reading must be over; None: none.
    deadline: Optional[float] = None
    #: What the deadline is, for the message when it passes.
    deadline_what: str = 'reading the source'
    #: Set when nobody waits for the reads any more (cancel, abort, shutdown).
    stop: Optional[threading.Event] = None

    def check(self) -> None:
        """Raise Cancelled once stopped, TimedOut once past the deadline."""
        if self.stop is not None and self.stop.is_set():
            raise Cancelled(f'{self.deadline_what}: stopped')
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimedOut(f'{self.deadline_what} took longer than its limit; '
                           'the source answers too slowly')

    def wait_for(self, timeout: Optional[float] = None) -> float:
        """Seconds one network wait may take: ``timeout`` (default: the
        request timeout), cut to what is left before the deadline."""
        self.check()
        wait = self.timeout if timeout is None else timeout
        if self.deadline is not None:
            wait = min(wait, max(0.001, self.deadline - time.monotonic()))
        return wait

    def connect_wait(self) -> float:
        """Seconds one connect may take: ``wait_for`` within CONNECT_LIMIT."""
        return self.wait_for(min(self.timeout, CONNECT_LIMIT))

    @property
    def connect_limit(self) -> float:
        return min(self.timeout, CONNECT_LIMIT)

    def pause(self, seconds: float) -> None:
        """Sleep between attempts, ending early (raising) on stop or deadline."""
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)
        self.check()

    def portable(self) -> Dict[str, Any]:
        """What another process rebuilds this context from (``rebuilt``);
        not the rados handle, the config-key reader, the deadline or the
        stop event, which are that process's own."""
        return {'allowed_file_roots': self.allowed_file_roots,
                'remote_conf_dir': self.remote_conf_dir, 'timeout': self.timeout,
                'retries': self.retries, 'redirect_origins': self.redirect_origins,
                'limits': asdict(self.limits)}

    @classmethod
    def rebuilt(cls, portable: Dict[str, Any], rados: Any,
                config_key: Callable[[str], Optional[str]]) -> 'SourceContext':
        return cls(**{**portable, 'limits': SourceLimits(**portable['limits'])},
                   rados=rados, config_key=config_key)

    def bounded(self, seconds: float, what: str) -> 'SourceContext':
        """A copy whose reads must all end within ``seconds`` from now."""
        deadline = time.monotonic() + seconds
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        return replace(self, deadline=deadline, deadline_what=what)
