"""Whether a source is still the one prepare saw.

"Completed" must mean every byte is the source's as it was at prepare.  A
file rewritten, an object overwritten or a URL now serving another image
would otherwise end in a target that mixes two versions, or is zero-filled
where the source shrank, and still reads "completed".  Prepare records each
stream's validators (size, and ETag, Last-Modified or mtime where the
stream has them); an execute compares them before it copies and once more
after, and fails with one line when they differ.
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .context import SourceContext
from .errors import SourceChanged
from .streams import open_stream

#: Field path -> that stream's validators.
Validators = Dict[str, Dict[str, str]]


def streams(spec: Mapping[str, Any]) -> List[Tuple[str, Mapping[str, Any]]]:
    """Every stream a spec names, with its field path (native sources have
    none: a snapshot holds them still)."""
    found = []
    if isinstance(spec.get('stream'), Mapping):
        found.append(('stream', spec['stream']))
    for n, snap in enumerate(spec.get('snapshots') or []):
        if isinstance(snap, Mapping) and isinstance(snap.get('stream'), Mapping):
            found.append((f'snapshots[{n}].stream', snap['stream']))
    return found


def read_validators(spec: Mapping[str, Any], ctx: SourceContext) -> Validators:
    out: Validators = {}
    for where, stream_spec in streams(spec):
        with open_stream(stream_spec, ctx) as stream:
            out[where] = dict(stream.validators())
    return out


def difference(before: Validators, now: Validators) -> Optional[str]:
    """The first change, as 'stream: etag "a" -> "b"'; None if none."""
    for where, then in before.items():
        current = now.get(where, {})
        for name, value in then.items():
            if current.get(name) != value:
                return f'{where}: {name} {value!r} -> {current.get(name)!r}'
    return None


def check_unchanged(spec: Mapping[str, Any], recorded: Optional[Validators],
                    ctx: SourceContext, when: str) -> None:
    """Raise SourceChanged when a source's validators differ from those
    ``recorded`` at prepare (records from before validators were kept
    carry none, and are not checked)."""
    if not recorded:
        return
    changed = difference(recorded, read_validators(spec, ctx))
    if changed is not None:
        raise SourceChanged(
            f'source-spec: {changed} since prepare ({when}); the source must not '
            'change while it is imported: abort the migration and prepare it again')
