"""The source-spec: the JSON document that says where an import reads from.

``rbd migration prepare --import-only --source-spec`` takes this document,
and librbd checks it only when it opens the source, field by field, answering
most mistakes with a bare EINVAL in a log the operator never sees.  We check
the whole document up front against SOURCE_SPEC_SCHEMA and turn the most
relevant failure into one line naming the field and what was expected.

The schema follows librbd as of Pacific (src/librbd/migration/), tightened
where librbd would accept something that cannot work or would surprise:
unknown fields are refused (librbd ignores them, so a typo surfaces late and
obscurely), ``file_path`` must be absolute (the rbd CLI's working directory
is not the mgr's), URLs need an explicit lower-case http(s) scheme, ids must
fit the integer librbd parses them into, and raw snapshots need a name
(librbd would invent a random UUID, so a retried import would not match).
Our own options live under EXTENSION_FIELD, which librbd ignores.
"""
import json
import re
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

from .errors import InvalidArgument
from .secrets import CONFIG_PREFIX, MASK, SECRET_FIELDS, mask_url

# -- What single values must look like ---------------------------------------
# Patterns end in \Z, not $: Python's $ also matches before a final newline.

#: An absolute POSIX path without NUL.
ABSOLUTE_PATH = r'^/[^\x00]*\Z'
_AUTHORITY = r'(?:\[[0-9A-Fa-f:.]+\]|[^\s/?#:@\[\]]+)(?::[0-9]{1,5})?'
#: http or https (librbd compares the scheme case-sensitively), userinfo
#: allowed, no whitespace.
HTTP_URL = r'^https?://(?:[^\s/?#@]+@)?' + _AUTHORITY + r'(?:[/?#]\S*)?\Z'
#: A path-style object URL.  librbd signs the request target as it stands
#: (AWS signature v2), so the bucket must be the first path segment and no
#: query string may follow the key.
S3_URL = r'^https?://' + _AUTHORITY + r'/[^\s/?#]+/[^\s?#]+\Z'
#: An NBD URI as libnbd reads it (the stream checks the rest: port, query,
#: local paths); ``nbd://`` alone is localhost:10809, as upstream accepts.
NBD_URI = r'^nbds?(?:\+unix)?://\S*\Z'
#: An id given as a string: librbd accepts "5" as well as 5.
DECIMAL = r'^[0-9]+\Z'
#: A name librbd takes as a C string: a NUL would cut it short ('img\x00x'
#: names 'img'), and librbd's import hangs on such a source-spec.
NO_NUL = r'^[^\x00]*\Z'
#: Another cluster's name: a conf file's name in the conf directory, so
#: nothing that could leave it.
CLUSTER_NAME = r'^[A-Za-z0-9][A-Za-z0-9_-]*\Z'
CLIENT_NAME = r'^client\.[A-Za-z0-9][A-Za-z0-9_.-]*\Z'
MON_HOST = r'^[^\x00-\x1f]+\Z'
#: A credential may be anything but a config:// reference without a key.
CREDENTIAL = r'^(?!' + re.escape(CONFIG_PREFIX) + r'\Z)'

#: librbd parses pool_id as int64_t.
POOL_ID_MAX = 2**63 - 1
#: librbd parses snap_id as uint64_t; the top two values are CEPH_SNAPDIR and
#: CEPH_NOSNAP, never a real snapshot.
SNAP_ID_MAX = 2**64 - 3
_ID_LIMITS = {'pool-id': POOL_ID_MAX, 'snap-id': SNAP_ID_MAX}


def _decimal_within(limit: int) -> Callable[[object], bool]:
    """Range check for an id given as a string of digits ('type' and
    'pattern' report every other shape)."""
    def check(value: object) -> bool:
        if not (isinstance(value, str) and value.isascii()
                and value.isdigit()):
            return True
        digits = value.lstrip('0') or '0'
        return len(digits) <= len(str(limit)) and int(digits) <= limit
    return check


_ID_RANGES = FormatChecker(formats=())
for _name, _limit in _ID_LIMITS.items():
    _ID_RANGES.checks(_name)(_decimal_within(_limit))

# -- Building blocks ---------------------------------------------------------

#: Our own options, e.g. {"rbd_migration": {"engine": ...}}.  Add each new
#: option to EXTENSION_PROPERTIES; unknown ones are refused like anywhere else.
EXTENSION_FIELD = 'rbd_migration'
EXTENSION_PROPERTIES: Dict[str, Any] = {
    # Which engine imports: librbd's live import when it can read the source
    # (auto, the default), or always our adapter engine.
    'engine': {'enum': ['auto', 'librbd', 'adapter']},
    # Whether an import librbd cannot read itself is live (served to librbd
    # as a view by the mgr; the default) or hidden until commit (false).
    'live': {'type': 'boolean'},
}
_EXTENSIONS = {'type': 'object', 'properties': EXTENSION_PROPERTIES,
               'additionalProperties': False}

_NAME = {'type': 'string', 'minLength': 1, 'pattern': NO_NUL}
_CREDENTIAL = {'type': 'string', 'minLength': 1, 'pattern': CREDENTIAL}
_STREAM = {'$ref': '#/$defs/stream'}


def _closed(properties: Dict[str, Any], *required: str,
            **more: Any) -> Dict[str, Any]:
    """An object with exactly these fields."""
    return {'type': 'object', 'properties': properties,
            'required': list(required), 'additionalProperties': False, **more}


def _tagged(kinds: Sequence[str], suffix: str) -> Dict[str, Any]:
    """A union told apart by its 'type' field.  'type' is checked on its own
    and only the branch it names is applied, so every error is about the
    kind the operator chose rather than a mix of all of them."""
    return {
        'type': 'object',
        'required': ['type'],
        'properties': {'type': {'enum': sorted(kinds)}},
        'allOf': [{'if': {'type': 'object', 'required': ['type'],
                          'properties': {'type': {'const': kind}}},
                   'then': {'$ref': f'#/$defs/{kind}_{suffix}'}}
                  for kind in sorted(kinds)],
    }


def _either(first: str, second: str) -> Dict[str, Any]:
    """Exactly one of two fields, as librbd insists for name versus id."""
    return {'anyOf': [{'required': [first]}, {'required': [second]}],
            'not': {'required': [first, second]}}


def _rbd_id(limit_name: str) -> Dict[str, Any]:
    return {'type': ['integer', 'string'], 'minimum': 0,
            'maximum': _ID_LIMITS[limit_name], 'pattern': DECIMAL,
            'format': limit_name}


# -- The schema --------------------------------------------------------------

STREAMS: Dict[str, Dict[str, Any]] = {
    'file': _closed({'type': {'const': 'file'},
                     'file_path': {'type': 'string',
                                   'pattern': ABSOLUTE_PATH}},
                    'type', 'file_path'),
    'http': _closed({'type': {'const': 'http'},
                     'url': {'type': 'string', 'pattern': HTTP_URL}},
                    'type', 'url'),
    # Upstream's field name: a spec written for librbd carries over.
    'nbd': _closed({'type': {'const': 'nbd'},
                    'uri': {'type': 'string', 'pattern': NBD_URI}},
                   'type', 'uri'),
    's3': _closed({'type': {'const': 's3'},
                   'url': {'type': 'string', 'pattern': S3_URL},
                   'access_key': _CREDENTIAL,
                   'secret_key': _CREDENTIAL},
                  'type', 'url', 'access_key', 'secret_key'),
}

FORMATS: Dict[str, Dict[str, Any]] = {
    # Import-only needs a snapshot: librbd refuses HEAD ("snapshot required
    # for import to keep source read-only").
    'native': _closed({'type': {'const': 'native'},
                       'pool_name': _NAME,
                       'pool_id': _rbd_id('pool-id'),
                       'pool_namespace': {'type': 'string', 'pattern': NO_NUL},
                       'image_name': _NAME,
                       'image_id': _NAME,
                       'snap_name': _NAME,
                       'snap_id': _rbd_id('snap-id'),
                       # Another cluster: upstream's fields, two exclusive forms.
                       'cluster_name': {'type': 'string', 'pattern': CLUSTER_NAME},
                       'client_name': {'type': 'string', 'pattern': CLIENT_NAME},
                       'mon_host': {'type': 'string', 'pattern': MON_HOST},
                       'key': _CREDENTIAL,
                       EXTENSION_FIELD: _EXTENSIONS},
                      'type', 'image_name',
                      allOf=[_either('pool_name', 'pool_id'),
                             _either('snap_name', 'snap_id'),
                             {'not': {'required': ['cluster_name', 'mon_host']}},
                             {'dependentRequired': {'mon_host': ['key'], 'key': ['mon_host']}},
                             {'if': {'required': ['client_name']},
                              'then': {'anyOf': [{'required': ['cluster_name']},
                                                 {'required': ['mon_host']}]}}]),
    'qcow': _closed({'type': {'const': 'qcow'},
                     'stream': _STREAM,
                     EXTENSION_FIELD: _EXTENSIONS},
                    'type', 'stream'),
    # A VMware disk: a sparse or streamOptimized file, or a descriptor
    # whose extent files lie beside it.
    'vmdk': _closed({'type': {'const': 'vmdk'},
                     'stream': _STREAM,
                     EXTENSION_FIELD: _EXTENSIONS},
                    'type', 'stream'),
    # The disk of an OVA (a tar): by member name or index among its disks,
    # needed only when it holds several.
    'ova': _closed({'type': {'const': 'ova'},
                    'stream': _STREAM,
                    'disk': {'type': ['string', 'integer'], 'minimum': 0,
                             'minLength': 1, 'pattern': NO_NUL},
                    EXTENSION_FIELD: _EXTENSIONS},
                   'type', 'stream'),
    'raw': _closed({'type': {'const': 'raw'},
                    'stream': _STREAM,
                    'snapshots': {'type': 'array',
                                  'items': {'$ref': '#/$defs/raw_snapshot'}},
                    EXTENSION_FIELD: _EXTENSIONS},
                   'type', 'stream'),
    # `rbd export --export-format 2`: the snapshots are inside the stream.
    'export': _closed({'type': {'const': 'export'},
                       'stream': _STREAM,
                       EXTENSION_FIELD: _EXTENSIONS},
                      'type', 'stream'),
    # A base (a raw image or `rbd export-diff` from nothing) and the
    # `rbd export-diff` files after it, oldest first, each starting where
    # the one before ends.  A name is needed only where the files give none
    # (a raw base that no diff follows); it overrides what the file says.
    'export-diff': _closed({'type': {'const': 'export-diff'},
                            'stream': _STREAM,
                            'name': _NAME,
                            'diffs': {'type': 'array',
                                      'items': _closed({'name': _NAME,
                                                        'stream': _STREAM},
                                                       'stream')},
                            EXTENSION_FIELD: _EXTENSIONS},
                           'type', 'stream'),
}

SOURCE_SPEC_SCHEMA: Dict[str, Any] = {
    '$schema': 'https://json-schema.org/draft/2020-12/schema',
    'title': 'rbd migration prepare --import-only --source-spec',
    **_tagged(list(FORMATS), 'format'),
    '$defs': {
        **{f'{kind}_format': schema for kind, schema in FORMATS.items()},
        # oldest first; one thick raw export per snapshot
        'raw_snapshot': _closed({'type': {'enum': ['raw']},
                                 'name': _NAME,
                                 'stream': _STREAM},
                                'type', 'name', 'stream'),
        'stream': _tagged(list(STREAMS), 'stream'),
        **{f'{kind}_stream': schema for kind, schema in STREAMS.items()},
    },
}


def _is_integer(checker: object, instance: object) -> bool:
    # JSON Schema counts 5.0 as an integer; librbd's JSON parser does not.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        'integer', _is_integer))
_VALIDATOR = _Validator(SOURCE_SPEC_SCHEMA, format_checker=_ID_RANGES)

# -- Turning a validation error into one line --------------------------------

Path = Tuple[Union[str, int], ...]

_TYPE_NAMES = {'object': 'an object', 'array': 'an array',
               'string': 'a string', 'integer': 'an integer',
               'number': 'a number', 'boolean': 'a boolean', 'null': 'null'}
_IDENTIFIER = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\Z')


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return 'an object'
    if isinstance(value, list):
        return 'an array'
    if isinstance(value, str):
        return 'a string'
    if isinstance(value, bool):
        return 'a boolean'
    if isinstance(value, int):
        return 'an integer'
    if isinstance(value, float):
        return 'a number'
    return 'null'


def _where(path: Path) -> str:
    """``snapshots[0].stream.url``; odd keys are quoted so the line stays one
    line whatever the document holds."""
    text = ''
    for part in path:
        if isinstance(part, int):
            text += f'[{part}]'
        elif _IDENTIFIER.match(part):
            text += f'.{part}' if text else part
        else:
            text += f'[{part!r}]'
    return text


def _show(value: object, path: Path) -> str:
    """A value as quoted in a message: short, one line, secrets masked."""
    if path and path[-1] in SECRET_FIELDS:
        return repr(MASK)
    if isinstance(value, str):
        text = mask_url(value)
        return repr(text if len(text) <= 60 else text[:57] + '...')
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else 'a very large integer'
    if isinstance(value, float):
        return repr(value)
    return _json_type(value)


#: What a pattern means, keyed by the pattern itself (the same field name
#: 'url' carries different patterns for http and s3).
_PATTERN_MESSAGES = {
    ABSOLUTE_PATH: '{value} is not an absolute path',
    HTTP_URL: '{value} is not an http(s) URL',
    S3_URL: '{value} is not an S3 object URL '
            '(expected http(s)://host[:port]/bucket/key)',
    NBD_URI: '{value} is not an NBD URI (expected nbd[s]://host[:port][/export] '
             'or nbd[s]+unix:///[export]?socket=PATH)',
    DECIMAL: '{value} is not a non-negative integer',
    NO_NUL: '{value} contains a NUL character',
    CREDENTIAL: f"'{CONFIG_PREFIX}' must be followed by a config-key name",
    CLUSTER_NAME: '{value} is not a cluster name (letters, digits, _ and -)',
    CLIENT_NAME: "{value} is not a client name (expected 'client.<id>')",
    MON_HOST: '{value} contains control characters',
}

#: Wording for particular fields where the validator's generic wording would
#: not point at the fix, keyed by (path pattern, validator); '*' in a pattern
#: stands for any one key or index.
_FIELD_MESSAGES: Dict[Tuple[Path, str], str] = {
    (('snapshots', '*', 'type'), 'enum'):
        "{value} is not supported: every snapshot must be of type 'raw'",
    (('pool_id',), 'type'):
        'expected a pool id (an integer or a string of digits), got {got}',
    (('snap_id',), 'type'):
        'expected a snapshot id (an integer or a string of digits), got {got}',
}


# Each wording gets the offending value, the validator's argument (the
# pattern, the list of required fields, ...) and the path.
Wording = Callable[[Any, Any, Path], str]


def _type(value: Any, expected: Any, path: Path) -> str:
    names = [expected] if isinstance(expected, str) else expected
    return (f"expected {' or '.join(_TYPE_NAMES[n] for n in names)}, "
            f'got {_json_type(value)}')


def _enum(value: Any, options: Any, path: Path) -> str:
    listed = ', '.join(map(str, options))
    if isinstance(value, str):
        return f'{_show(value, path)} is not one of {listed}'
    return f'expected one of {listed}, got {_json_type(value)}'


def _quoted(names: Any) -> str:
    return ' or '.join(f"'{name}'" for name in names)


#: One wording per validator, for every validator the schema uses
#: ('additionalProperties' moves the path onto the key: see _unknown_field).
_MESSAGES: Dict[str, Wording] = {
    'type': _type,
    'enum': _enum,
    'required': lambda value, required, path: (
        "missing required field '{}'".format(
            next(name for name in required if name not in value))),
    # _either: anyOf [{required: [a]}, {required: [b]}], not {required: [a, b]}
    'anyOf': lambda value, branches, path: 'missing required field ' + _quoted(
        name for branch in branches for name in branch['required']),
    'not': lambda value, both, path: (
        f"give either {_quoted(both['required'])}, not both"),
    'dependentRequired': lambda value, needs, path: next(
        f"'{field}' needs '{need}'" for field, wanted in needs.items() if field in value
        for need in wanted if need not in value),
    'minLength': lambda value, length, path: 'must not be empty',
    'minimum': lambda value, minimum, path: (
        f'{_show(value, path)} is negative'),
    'maximum': lambda value, maximum, path: (
        f'{_show(value, path)} is too large (at most {maximum})'),
    'format': lambda value, limit_name, path: (
        f'{_show(value, path)} is too large '
        f'(at most {_ID_LIMITS[limit_name]})'),
    'pattern': lambda value, pattern, path: _PATTERN_MESSAGES[pattern].format(
        value=_show(value, path)),
}


def _unknown_field(value: Any, schema: Any, path: Path) -> Tuple[Path, str]:
    allowed = list(schema.get('properties', {}))
    unknown = next(key for key in value if key not in allowed)
    return (path + (unknown,),
            f"unknown field (allowed: {', '.join(allowed) or 'none'})")


#: Which of several errors to report: the shallowest, and at equal depth the
#: one about the most basic mistake (wrong kind of value, unknown field,
#: missing field, then a bad value).
_PRIORITY = ('type', 'enum', 'additionalProperties', 'required', 'anyOf',
             'not')


def _relevance(error: ValidationError) -> Tuple[int, int]:
    rank = (_PRIORITY.index(error.validator) if error.validator in _PRIORITY
            else len(_PRIORITY))
    return len(error.absolute_path), rank


def _field_message(path: Path, validator: str) -> Optional[str]:
    for (pattern, name), template in _FIELD_MESSAGES.items():
        if name == validator and len(pattern) == len(path) and all(
                want in ('*', have) for want, have in zip(pattern, path)):
            return template
    return None


def _describe(error: ValidationError) -> str:
    path: Path = tuple(error.absolute_path)
    validator = str(error.validator)
    value: Any = error.instance
    argument: Any = error.validator_value
    if validator == 'additionalProperties':
        path, text = _unknown_field(value, error.schema, path)
    else:
        template = _field_message(path, validator)
        if template is not None:
            text = template.format(value=_show(value, path),
                                   got=_json_type(value))
        elif validator in _MESSAGES:
            text = _MESSAGES[validator](value, argument, path)
        else:  # a validator added to the schema without a wording here
            text = f'is not valid ({validator})'
    where = _where(path)
    return f'source-spec: {where}: {text}' if where else f'source-spec: {text}'


# -- Parsing -----------------------------------------------------------------

class _BadJSON(ValueError):
    """JSON that Python would accept but librbd's parser would not."""


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    # Which of two equal keys wins differs between parsers; refuse both.
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _BadJSON(f'field {key!r} appears twice in one object')
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _BadJSON(f'{name} is not valid JSON')


def _bounded_int(digits: str) -> int:
    # Python refuses to convert over 4300 digits with an unhelpful message.
    if len(digits.lstrip('-')) > 40:
        raise _BadJSON(f'integer {digits[:12]}... has too many digits')
    return int(digits)


def parse_source_spec(text: str) -> Dict[str, Any]:
    """The validated source-spec in ``text``, returned as written (ids given
    as strings stay strings: librbd accepts them).

    Raises InvalidArgument with one line starting 'source-spec:'.
    """
    try:
        spec = json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f'source-spec: invalid JSON at line {e.lineno} '
                              f'column {e.colno}: {e.msg}') from None
    except _BadJSON as e:
        raise InvalidArgument(f'source-spec: invalid JSON: {e}') from None
    except RecursionError:
        raise InvalidArgument(
            'source-spec: invalid JSON: nested too deeply') from None
    return validate_source_spec(spec)


def native_spec(text: str) -> Dict[str, Any]:
    """The native source-spec that ``rbd migration prepare --import-only
    [pool/[namespace/]]image@snap <dest>`` means, as librbd builds it."""
    image, at, snap = text.strip().partition('@')
    parts = image.split('/')
    if not at or not snap or not 1 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(
            f'source_image_spec: {text!r}: with --import-only and a target, the '
            'source is [pool/[namespace/]]image@snapshot (a snapshot keeps it still); '
            'or give a source-spec (--source-spec or -i) and the target alone')
    if len(parts) < 3:  # pool rbd and no namespace, as rbd takes them
        parts = (['rbd'] + parts)[-2:]
        parts.insert(1, '')
    pool, namespace, name = parts
    spec: Dict[str, Any] = {'type': 'native', 'pool_name': pool, 'image_name': name,
                            'snap_name': snap}
    if namespace:
        spec['pool_namespace'] = namespace
    return validate_source_spec(spec)


def validate_source_spec(spec: object) -> Dict[str, Any]:
    """Check an already-parsed source-spec (one built in code, say) and
    return it, now known to be an object.

    Raises InvalidArgument naming the most relevant problem.
    """
    if not isinstance(spec, dict):
        raise InvalidArgument(
            f'source-spec: expected a JSON object, got {_json_type(spec)}')
    errors = list(_VALIDATOR.iter_errors(spec))
    if errors:
        raise InvalidArgument(_describe(min(errors, key=_relevance)))
    _check_snapshot_names(spec)
    return spec


def _check_snapshot_names(spec: Mapping[str, Any]) -> None:
    """Snapshot names must differ: the second one would fail with EEXIST
    only after the data before it had been copied."""
    first_index: Dict[str, int] = {}
    for index, snapshot in enumerate(spec.get('snapshots', [])):
        first = first_index.setdefault(snapshot['name'], index)
        if first != index:
            path: Path = ('snapshots', index, 'name')
            raise InvalidArgument(
                f'source-spec: {_where(path)}: '
                f"{_show(snapshot['name'], path)} is already the name of "
                f'snapshots[{first}]')


# -- Describing a spec -------------------------------------------------------

def _printable(value: object) -> str:
    text = str(value)
    return text if text.isprintable() else repr(text)


def _native_name(spec: Mapping[str, Any]) -> str:
    pool = (spec['pool_name'] if 'pool_name' in spec
            else f"pool#{spec.get('pool_id')}")
    namespace = spec.get('pool_namespace')
    snap = (spec['snap_name'] if 'snap_name' in spec
            else f"snap#{spec.get('snap_id')}")
    name = '/'.join(str(part) for part in
                    (pool, namespace, spec.get('image_name')) if part)
    text = f'{name}@{snap}'
    if spec.get('image_id'):
        text += f" (image id {spec['image_id']})"
    return _printable(text)


def _stream_location(stream: Mapping[str, Any]) -> str:
    if stream.get('type') == 'file':
        return _printable(stream.get('file_path'))
    return _printable(mask_url(str(stream.get('url', stream.get('uri')))))


def spec_summary(spec: Mapping[str, Any]) -> str:
    """One line for humans about a validated spec, secrets masked:
    ``native rbd/ns/img@snap``, ``qcow over http https://host/disk.qcow2``,
    ``raw over file /mnt/head.raw with 2 snapshots``."""
    kind = _printable(spec.get('type'))
    if kind == 'native':
        return f'native {_native_name(spec)}'
    stream = spec.get('stream')
    if not isinstance(stream, Mapping):
        return f'{kind} without a stream'
    text = (f"{kind} over {_printable(stream.get('type'))} "
            f'{_stream_location(stream)}')
    count = len(spec.get('snapshots') or [])
    if count:
        text += f" with {count} snapshot{'s' if count > 1 else ''}"
    return text
