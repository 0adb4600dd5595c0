"""What opening a source needs from its surroundings.

Passed in explicitly so that streams and formats stay importable and
testable without a running mgr.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional


@dataclass
class SourceContext:
    #: Directories under which ``file`` streams may read; empty refuses all.
    allowed_file_roots: List[str] = field(default_factory=list)
    #: Resolves a ``config://<key>`` reference from the mon config-key store.
    config_key: Optional[Callable[[str], Optional[str]]] = None
    #: A connected ``rados.Rados`` for ``native`` sources.
    rados: Optional[Any] = None
    #: Network timeout for one request, in seconds.
    timeout: float = 30.0
    #: Attempts for one read on a transient failure (connection error, 5xx).
    retries: int = 5
