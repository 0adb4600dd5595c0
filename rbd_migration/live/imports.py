"""Live imports: a source librbd cannot read itself, served to it as a view.

For an import the probe sends to the adapter engine (compressed or layered
qcow2, export, export-diff, VMDK, NBD, URLs with credentials...), the
module serves a :class:`~rbd_migration.live.view.QcowView` of the source
on its endpoint and prepares librbd's own import-only migration on
``{"type": "qcow", "stream": {"type": "http", "url": <endpoint>/<token>}}``.
librbd then gives clients the target from prepare on, as for any import it
reads itself: reads of data not yet copied go to the endpoint, writes win
over the copy, ``rbd status`` and listings show the image.

The import stays hidden (the adapter engine's path) when the operator asks
for it (``"rbd_migration": {"live": false}`` or ``"engine": "adapter"``,
or the ``live_imports`` option off), when the endpoint is not listening, or
when the view cannot present the source (more snapshots, or a size, than
librbd's qcow2 reader takes); :meth:`LiveImports.why_hidden` and
:meth:`LiveImports.open_view` say which.

What is kept: the registration of the migration holds the view's token,
validators and source-spec (``ViewRecord``), so that the next active mgr
serves the same URL after a failover (the URL is in the target's header,
which librbd reads at each open), and what librbd reads to open the view
(``live/pinned.py``: a failed read there crashes librbd 16.2).  There,
each view opens again at the first read of its data, and checks first that
the source is still the one prepare saw and that its tables are the ones
kept: a changed source fails the client's read instead of mixing data.
"""
import logging
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..context import SourceContext
from ..errors import Cancelled, InvalidArgument, MigrationError
from ..source_spec import EXTENSION_FIELD
from ..streams import open_stream
from ..validators import Validators, check_unchanged
from . import handover
from .pinned import Pinned, PinnedView, check_same, pin
from .server import ServerLimits, ViewServer, mask_token
from .view import QcowView

log = logging.getLogger(__name__)

#: The path a live import takes (beside probe's 'librbd' and 'adapter').
LIVE = 'live'

#: A context for reading sources, ended when ``stop`` is set.
ContextFor = Callable[[Optional[threading.Event]], SourceContext]

#: Seconds the source has to take a second reader beside the view's.
SECOND_READER_WAIT = 3.0


@dataclass
class ViewRecord:
    """What serves a live import's view again, as kept in its registration."""

    token: str
    etag: str
    modified: float
    #: The source-spec the view presents (unresolved: config:// stays a reference).
    spec: Dict[str, Any]
    validators: Validators
    #: What librbd reads to open the view (``Pinned.to_text``).
    pinned: str = ''
    #: Whether the copy is to be made sparse after execute: the source says
    #: nothing of its zeros (raw), so librbd wrote them as data.
    sparsify: bool = False
    #: Whether prepare turned the target's fast-diff off, for execute to turn
    #: it on again (engine/librbd.py ``pause_fast_diff`` says why).
    fast_diff: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'ViewRecord':
        return cls(token=str(data['token']), etag=str(data['etag']),
                   modified=float(data['modified']), spec=dict(data['spec']),
                   validators=dict(data.get('validators') or {}),
                   pinned=str(data.get('pinned') or ''),
                   sparsify=bool(data.get('sparsify')),
                   fast_diff=bool(data.get('fast_diff')))


def asks_hidden(spec: Mapping[str, Any]) -> Optional[str]:
    """Why the source-spec itself asks for the hidden path, if it does."""
    ours = spec.get(EXTENSION_FIELD, {})
    if ours.get('live') is False:
        return 'the source-spec asks for it ("rbd_migration": {"live": false})'
    if ours.get('engine') == 'adapter':
        return 'the source-spec asks for the adapter engine ("engine": "adapter")'
    return None


class LiveImports:
    """The mgr's endpoint and the views it serves."""

    def __init__(self, context_for: ContextFor,
                 limits: ServerLimits = ServerLimits()) -> None:
        self._context_for = context_for
        self._limits = limits
        self._lock = threading.Lock()
        self.server: Optional[ViewServer] = None
        self._listener: Optional[socket.socket] = None
        #: The host clients reach the endpoint at.
        self.host = ''
        #: Why the endpoint is not listening ('' once it is).
        self.down = 'the live endpoint is not started'

    # -- the endpoint ----------------------------------------------------------
    def start(self, bind: str, port: int, host: str,
              before_serving: Callable[[], object] = lambda: None) -> None:
        """Listen on ``bind``:``port``, advertised as ``host``; a failure is
        kept (``down``) and imports then take the hidden path.  Connections
        are answered only once ``before_serving`` (which serves the views
        prepared before) returns: librbd reads a 404 as a source that has no
        data there and hands the client zeros (measured: one read of zeros
        per ``ceph mgr fail`` while views were registered after listening).
        Connections made meanwhile wait in the backlog."""
        self.stop()
        try:
            listener = handover.listen((bind, port))
            server = ViewServer((bind, port), self._limits, log=log,
                                listener=listener, start=False)
        except OSError as e:
            self.down = (f'the live endpoint cannot listen on {bind or "*"}:{port} '
                         f'({e.strerror or e}); set live_endpoint_address and '
                         'live_endpoint_port to a free local address')
            log.warning('%s', self.down)
            return
        with self._lock:
            self.server, self.host, self.down = server, host, ''
            self._listener = listener
        try:
            before_serving()
        finally:
            server.start()
        log.info('live endpoint listening on %s:%d, advertised as %s',
                 server.address[0], server.address[1], host)

    def stop(self) -> None:
        """Stop serving and close the listening socket (not handed over: a
        respawn's ``execv`` happens without this)."""
        with self._lock:
            server, self.server = self.server, None
            listener, self._listener = self._listener, None
            self.down = 'the live endpoint is stopped'
        if listener is not None:
            handover.forget(listener)
        if server is not None:
            server.stop()

    def counters(self) -> Dict[str, Any]:
        """What the endpoint did, for status; empty when it is down."""
        server = self.server
        if server is None:
            return {'listening': False, 'why': self.down}
        return dict(server.counters(), listening=True,
                    url=server.url('<token>', self.host))

    # -- choosing the path -----------------------------------------------------
    def why_hidden(self, spec: Mapping[str, Any], enabled: bool) -> Optional[str]:
        """Why an import the adapter engine reads stays hidden; None when it
        can be live."""
        asked = asks_hidden(spec)
        if asked:
            return asked
        if not enabled:
            return 'the live_imports option is off'
        return self.down or None

    def open_view(self, spec: Mapping[str, Any]) -> Tuple[QcowView, Pinned]:
        """The view of the source, opened for serving (its reads end when
        the endpoint stops), and what librbd reads to open it.  Raises
        InvalidArgument when a view cannot present the source; the caller
        then takes the hidden path."""
        server = self._server()
        ctx = self._context_for(server.stopping)
        view = QcowView.from_spec(spec, ctx)
        try:
            pinned = pin(view)
            _check_second_reader(spec, ctx)
            return view, pinned
        except BaseException:
            view.close()
            raise

    # -- serving ---------------------------------------------------------------
    def serve(self, view: QcowView, pinned: Pinned, spec: Mapping[str, Any],
              validators: Validators) -> ViewRecord:
        """Serve an opened view under a new token; what keeps it."""
        server = self._server()
        record = ViewRecord(token=secrets.token_urlsafe(32), etag=secrets.token_hex(8),
                            modified=time.time(), spec=dict(spec),
                            validators=dict(validators), pinned=pinned.to_text(),
                            sparsify=view.index.head_dense)
        server.add(PinnedView(pinned, lambda: view), record.token, record.etag,
                   record.modified)
        return record

    def restore(self, record: ViewRecord) -> None:
        """Serve a view again (after a restart or failover) under its token;
        it opens at its first request, once its source is found unchanged."""
        server = self._server()

        def open_checked() -> QcowView:
            ctx = self._context_for(server.stopping)
            check_unchanged(record.spec, record.validators, ctx,
                            'when the live view opened again')
            view = QcowView.from_spec(record.spec, ctx)
            return check_same(view, pinned) if pinned is not None else view

        pinned = Pinned.from_text(record.pinned) if record.pinned else None
        source = PinnedView(pinned, open_checked) if pinned is not None else open_checked
        try:
            server.add(source, record.token, record.etag, record.modified)
        except ValueError as e:  # already served: a second restore
            log.debug('view %s: %s', mask_token(record.token), e)

    def remove(self, token: str) -> None:
        server = self.server
        if server is not None:
            server.remove(token)

    def source_spec(self, token: str) -> Dict[str, Any]:
        """The source-spec librbd is prepared on: the view at the endpoint."""
        server = self._server()
        return {'type': 'qcow',
                'stream': {'type': 'http', 'url': server.url(token, self.host)}}

    def _server(self) -> ViewServer:
        server = self.server
        if server is None:
            raise InvalidArgument(self.down)
        return server


def _check_second_reader(spec: Mapping[str, Any], ctx: SourceContext) -> None:
    """A live import reads its source from two places at once: the view
    (for clients) and the execute's copy.  A source that serves one reader
    at a time (``qemu-nbd`` without ``--shared``) would leave every attempt
    of the copy waiting for its handshake, so it is found now, with the
    view's reader open, and the import takes the hidden path instead."""
    stream = spec.get('stream')
    if not isinstance(stream, Mapping):
        return
    try:
        open_stream(stream, replace(ctx, timeout=SECOND_READER_WAIT, retries=1)).close()
    except Cancelled:
        raise
    except MigrationError as e:
        why = str(e).removeprefix('source-spec: ')
        raise InvalidArgument(
            f'the source did not take a second reader while the live view held one '
            f'({why}); a live import reads it twice at once: serve it to two clients '
            '(qemu-nbd --shared 2 or more)') from None
