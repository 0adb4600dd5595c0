"""The pre-flight probe: read the source before anything is created.

librbd accepts a source-spec and learns late, or never, that it cannot read
the source: a compressed qcow2 imports as zeros, a backing file is a bare
EOPNOTSUPP, a wrong key or URL is a bare errno at execute.  The probe opens
the source through our own adapters (the same the copier and verify use),
checks that it is reachable, sized and of the format named, and decides
which path can serve it.  A failed probe raises before the target exists.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional
from urllib.parse import urlsplit

from .context import SourceContext
from .errors import InvalidArgument, MigrationError, Unsupported
from .formats import open_format
from .formats.base import Format, FormatFeatures
from .formats.detect import SNIFF_LENGTH, sniff
from .secrets import SECRET_FIELDS, is_config_ref
from .source_spec import EXTENSION_FIELD
from .streams import open_stream
from .streams.base import Stream
from .validators import streams

LIBRBD = 'librbd'
ADAPTER = 'adapter'
#: Formats librbd's import has no reader for.
LIBRBD_FORMATS = ('raw', 'qcow', 'native')


@dataclass
class ProbeReport:
    type: str
    size: int
    snapshots: List[str]
    #: Which engine serves the migration: librbd reading the source itself,
    #: librbd reading the module's view of it (live), or the adapter engine.
    path: str = LIBRBD
    #: Why librbd cannot read the source itself, when it is not librbd's.
    reasons: List[str] = field(default_factory=list)
    features: Dict[str, Any] = field(default_factory=dict)
    location: str = ''
    #: For the adapter engine's imports: why the target stays hidden until
    #: commit ('' when it is live, served to librbd as a view).
    hidden: str = ''

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def probe(spec: Mapping[str, Any], ctx: SourceContext,
          object_size: int = 4 << 20) -> ProbeReport:
    """Open, check and describe a validated (unresolved) source-spec, and
    pick the path: librbd's live import when librbd can read the source
    correctly, our adapter engine otherwise (or when the spec asks for it).
    ``object_size`` is the target's."""
    location = _check_bytes_match_type(spec, ctx)
    with open_format(spec, ctx) as fmt:
        size = fmt.size()
        snaps = [s.name for s in fmt.snapshots()]
        features = getattr(fmt, 'features', None) or FormatFeatures()
        _refuse_what_nobody_can_read(features, location)
        _check_readable(fmt, size, location)
    reasons = _why_not_librbd(spec, features, location)
    reasons += _librbd_16_2_fails(spec, size, object_size, location)
    reasons += _librbd_would_cost(features, location, ctx.limits.metadata_bytes)
    reasons += _librbd_snapshot_cost(spec, len(snaps), location)
    wanted = spec.get(EXTENSION_FIELD, {}).get('engine', 'auto')
    if wanted == LIBRBD and reasons:
        raise Unsupported(f'{reasons[0]}; drop "engine": "librbd" to let the '
                          'adapter engine import it')
    path = ADAPTER if (wanted == ADAPTER or reasons) else LIBRBD
    return ProbeReport(type=spec['type'], size=size, snapshots=snaps, path=path,
                       reasons=reasons,
                       features={k: v for k, v in asdict(features).items() if v},
                       location=location)


def _check_bytes_match_type(spec: Mapping[str, Any], ctx: SourceContext) -> str:
    """A qcow2 file declared ``raw`` would import its metadata as disk data;
    a source that does not serve the last byte of the size it claims (a
    Content-Length that lies) sends librbd's execute into an endless loop of
    refused requests."""
    if 'stream' not in spec:
        return _native_location(spec)
    with open_stream(spec['stream'], ctx) as stream:
        head = stream.read(0, SNIFF_LENGTH)
        location = stream.description
        _check_whole(stream, location)
    detected = sniff(head)
    if spec['type'] == 'raw' and detected is not None:
        raise InvalidArgument(
            f"source-spec: type: 'raw', but {location} holds a {detected} "
            f'image; use "type": "{detected}"')
    return location


def _check_whole(stream: Stream, location: str) -> None:
    size = stream.size()
    if size <= 0:
        return
    try:
        last = stream.read(size - 1, 1)
    except MigrationError as e:
        if e.transient:
            raise
        last = b''
    if len(last) != 1:
        raise InvalidArgument(
            f'source-spec: {location} claims {size} bytes but does not serve the '
            'last of them; fix the server (its Content-Length or the object) and '
            'prepare again')


def _native_location(spec: Mapping[str, Any]) -> str:
    pool = spec.get('pool_name', f"#{spec.get('pool_id')}")
    ns = f"{spec['pool_namespace']}/" if spec.get('pool_namespace') else ''
    snap = spec.get('snap_name', f"#{spec.get('snap_id')}")
    where = f"rbd image {pool}/{ns}{spec.get('image_name')}@{snap}"
    other = spec.get('cluster_name') or spec.get('mon_host')
    return f"{where} of cluster '{other}'" if other else where


def _refuse_what_nobody_can_read(f: FormatFeatures, where: str) -> None:
    if f.encrypted:
        raise Unsupported(
            f'source-spec: {where} is an encrypted qcow2 image, which cannot be '
            'imported; decrypt it first (qemu-img convert --object secret,... '
            '--image-opts ... -O qcow2 plain.qcow2)')
    if f.external_data_file:
        # A path or URL inside the image is not one the operator named.
        raise Unsupported(
            f"source-spec: {where} keeps its data in external file "
            f"'{f.external_data_file}', which is not imported; convert it first "
            '(qemu-img convert -O qcow2 in.qcow2 out.qcow2)')


#: librbd holds an image's L1 tables about three times over while the mgr
#: opens it in a probe (measured: 16 MiB of tables, a 46 MiB peak), so it
#: gets images whose tables fit a quarter of source_max_metadata_bytes.
LIBRBD_TABLE_SHARE = 4


def _librbd_would_cost(f: FormatFeatures, where: str, bound: int) -> List[str]:
    """librbd's qcow2 reader loads every snapshot's L1 table each time it
    opens the image, which it does in the mgr for each status, execute and
    abort: measured, 512 snapshots of 1 MiB L1 tables cost the mgr 112 MiB
    per status and over 1 GiB per execute.  The module's reader keeps such
    tables within source_max_metadata_bytes."""
    if f.open_tables <= bound // LIBRBD_TABLE_SHARE:
        return []
    return [f'{where} has {f.open_tables / (1 << 20):.1f} MiB of L1 tables (its '
            "snapshots' included), which librbd would load into the mgr each time it "
            f'opens the image; the module reads them within {bound >> 20} MiB']


#: Snapshots of an imported source librbd gets at most.  Its import holds
#: about 60 KiB in the mgr per snapshot each time it opens the source and
#: target (measured over HTTP, 1 GiB disks: 128 snapshots, a 20 MiB peak per
#: probe; 512, a 44 MiB peak and 7-14 MiB more per status call), on top of
#: about 12 MiB for any import: past 64 a probe would pass 16 MiB.
LIBRBD_MAX_SNAPSHOTS = 64


def _librbd_snapshot_cost(spec: Mapping[str, Any], count: int, where: str) -> List[str]:
    if spec['type'] == 'native' or count <= LIBRBD_MAX_SNAPSHOTS:
        return []
    return [f'{where} has {count} snapshots, and librbd holds about 60 KiB in '
            f'the mgr per snapshot each time it opens the image; it gets '
            f'{LIBRBD_MAX_SNAPSHOTS} at most']


def _why_not_librbd(spec: Mapping[str, Any], f: FormatFeatures, where: str) -> List[str]:
    """What Pacific's librbd import would get wrong or refuse, measured:
    compressed clusters import as zeros, a backing file is a bare
    EOPNOTSUPP, URL credentials are refused and query strings dropped."""
    reasons = []
    if spec['type'] not in LIBRBD_FORMATS:
        reasons.append(f"librbd has no reader for type '{spec['type']}'")
    if f.compressed:
        reasons.append(f'{where} has compressed clusters '
                       f'({f.compression_type or "zlib"}), which librbd reads as zeros')
    if f.backing_file:
        reasons.append(f"{where} is an overlay on backing file '{f.backing_file}', "
                       'which librbd cannot follow')
    if f.extended_l2:
        reasons.append(f'{where} uses extended L2 entries, which librbd cannot read')
    if f.data_past_end:
        reasons.append(f'{where} has data clusters past the end of the file, which QEMU '
                       'reads as zeros and librbd imports otherwise')
    if spec['type'] == 'native' and ('cluster_name' in spec or 'mon_host' in spec):
        reasons.append(f'{where} is in another cluster, which librbd 16.2 cannot '
                       'open (its native format has no cluster_name or mon_host)')
    if any(stream.get('type') == 'nbd' for stream in _streams(spec)):
        reasons.append('librbd 16.2 has no nbd stream (it came with Ceph 19)')
    reasons += _urls_librbd_mangles(spec)
    reasons += _files_librbd_reopens(spec)
    reasons += _secrets_librbd_would_store(spec)
    return reasons


def _streams(spec: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The spec's streams: HEAD's and each snapshot's."""
    return [stream for _, stream in streams(spec)]


def _librbd_16_2_fails(spec: Mapping[str, Any], size: int, object_size: int,
                       where: str) -> List[str]:
    """Imports Pacific's librbd fails although the source is sound (the
    list, with the release that fixed each, is in docs/librbd-limits.rst)."""
    reasons = []
    if spec['type'] == 'raw' and spec.get('snapshots') and size % object_size:
        reasons.append(
            f'{where} has snapshots and a size ({size} bytes) that is not a multiple of '
            f"the target's object size ({object_size}), which librbd 16.2 cannot import "
            '(ERANGE from a file; over HTTP a short read it reports as done; fixed in '
            'later Ceph releases)')
    return reasons


def _urls_librbd_mangles(spec: Mapping[str, Any]) -> List[str]:
    """librbd's HTTP client refuses user:password@ and sends only the URL's
    path, dropping a query string (a presigned URL's signature)."""
    reasons = []
    for stream in _streams(spec):
        if stream.get('type') != 'http':
            continue
        url = urlsplit(stream['url'])
        if url.username is not None or url.password is not None:
            reasons.append('librbd cannot send credentials given in the URL '
                           '(user:password@)')
        if url.query:
            reasons.append('librbd drops the query string of the URL (a presigned '
                           'URL would lose its signature)')
    return reasons


def _files_librbd_reopens(spec: Mapping[str, Any]) -> List[str]:
    """librbd opens a file source again by its name at execute, inside the
    mgr: whatever is under that name then (a symlink to the mgr's keyring)
    would be imported, and no check made now can hold for it."""
    paths = [s['file_path'] for s in _streams(spec) if s.get('type') == 'file']
    return [f"librbd would open '{path}' again by name at execute, where a file "
            'swapped in after this check would be read; the module\'s reader keeps '
            'the file it checked open'
            for path in dict.fromkeys(paths)]


def _secrets_librbd_would_store(spec: Mapping[str, Any]) -> List[str]:
    """librbd keeps the source-spec in the target's header, where any client
    that may read the pool reads it too; a secret given inline would be
    stored there.  The adapter engine keeps the spec in the module's own
    store; a config:// reference is no secret."""
    fields = sorted({name for stream in _streams(spec) for name in SECRET_FIELDS
                     if isinstance(stream.get(name), str) and not is_config_ref(stream[name])})
    if not fields:
        return []
    return [f"librbd would store the inline {' and '.join(fields)} in the image's "
            'header, readable by every client of the pool; give them as config://<key> '
            'references to keep librbd\'s path']


def _check_readable(fmt: Format, size: int, where: str) -> None:
    """Read the first allocated bytes: reachable is not the same as readable."""
    if size <= 0:
        raise InvalidArgument(f'source-spec: {where} is empty (size 0)')
    first: Optional[int] = None
    for extent in fmt.extents():
        first = extent.offset
        break
    fmt.read(first or 0, min(4096, size - (first or 0)))
