"""Source-spec schema, error wording and summaries."""
import copy
import errno
import json
from typing import Any, Dict

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd_migration import formats, streams
from rbd_migration.errors import InvalidArgument
from rbd_migration.source_spec import (FORMATS, POOL_ID_MAX, SNAP_ID_MAX,
                                       SOURCE_SPEC_SCHEMA, STREAMS,
                                       parse_source_spec, spec_summary,
                                       validate_source_spec)

FILE = {'type': 'file', 'file_path': '/mnt/image.raw'}
HTTP = {'type': 'http', 'url': 'https://images.example.com/disk.img'}
S3 = {'type': 's3', 'url': 'http://s3.example.com:8080/bucket/dir/disk.img',
      'access_key': 'NX5QOQKC6BH2IDN8HC7A',
      'secret_key': 'LnEsqNNqZIpkzauboDcLXLcYaWwLQ3Kop0zAnKIn'}
NATIVE = {'type': 'native', 'pool_name': 'rbd', 'image_name': 'img',
          'snap_name': 'snap1'}


def spec(**fields: Any) -> Dict[str, Any]:
    """A raw-over-file spec with ``fields`` replaced (None removes one)."""
    base: Dict[str, Any] = {'type': 'raw', 'stream': copy.deepcopy(FILE)}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def native(**fields: Any) -> Dict[str, Any]:
    base = dict(NATIVE, **fields)
    return {k: v for k, v in base.items() if v is not None}


#: Every format type, as the errors list them (formats are added often).
TYPES = ', '.join(sorted(FORMATS))


def error_of(value: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_source_spec(value if isinstance(value, str) else json.dumps(value))
    assert caught.value.errno == errno.EINVAL
    return str(caught.value)


# -- the schema itself --------------------------------------------------------

def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SOURCE_SPEC_SCHEMA)


def test_schema_covers_exactly_the_registered_streams_and_formats() -> None:
    assert set(STREAMS) == set(streams.REGISTRY)
    assert set(FORMATS) == set(formats.REGISTRY)


def test_every_object_in_the_schema_is_closed() -> None:
    closed = (*FORMATS.values(), *STREAMS.values(),
              SOURCE_SPEC_SCHEMA['$defs']['raw_snapshot'])
    assert all(schema['additionalProperties'] is False for schema in closed)


# -- valid specs ----------------------------------------------------------------

VALID = {
    'raw over file': spec(),
    'raw over http': spec(stream=HTTP),
    'raw over s3': spec(stream=S3),
    'raw over s3, keys in config-key store': spec(stream=dict(
        S3, access_key='config://rbd/s3/access', secret_key='config://rbd/s3/secret')),
    'raw with snapshots over every stream': spec(snapshots=[
        {'type': 'raw', 'name': 'snap1', 'stream': FILE},
        {'type': 'raw', 'name': 'snap2', 'stream': HTTP},
        {'type': 'raw', 'name': 'snap3', 'stream': S3}]),
    'raw with no snapshots': spec(snapshots=[]),
    'qcow over file': {'type': 'qcow', 'stream': dict(FILE, file_path='/mnt/d.qcow2')},
    'qcow over http': {'type': 'qcow', 'stream': HTTP},
    'qcow over s3': {'type': 'qcow', 'stream': S3},
    'http with userinfo, port and query': spec(stream={
        'type': 'http', 'url': 'http://user:pw@host:8080/a/b.img?X-Amz-Signature=x#f'}),
    'http to an IPv6 literal': spec(stream={'type': 'http', 'url': 'http://[::1]:80/x'}),
    'http with no path': spec(stream={'type': 'http', 'url': 'https://host'}),
    'native by pool name and snap name': native(),
    'native by pool id and snap id': native(pool_name=None, pool_id=3,
                                            snap_name=None, snap_id=12),
    'native ids as numeric strings': native(pool_name=None, pool_id='3',
                                            snap_name=None, snap_id='12'),
    'native ids at zero': native(pool_name=None, pool_id=0, snap_name=None, snap_id='0'),
    'native ids at the limits': native(pool_name=None, pool_id=POOL_ID_MAX,
                                       snap_name=None, snap_id=str(SNAP_ID_MAX)),
    'native with namespace and image id': native(pool_namespace='ns1', image_id='10ab'),
    'native in the default namespace': native(pool_namespace=''),
    'empty extension object': spec(rbd_migration={}),
    'native with empty extension object': native(rbd_migration={}),
}


@pytest.mark.parametrize('value', VALID.values(), ids=list(VALID))
def test_valid_specs_are_returned_as_written(value: Dict[str, Any]) -> None:
    assert parse_source_spec(json.dumps(value)) == value


def test_numeric_string_ids_stay_strings() -> None:
    parsed = parse_source_spec(json.dumps(native(pool_name=None, pool_id='7')))
    assert parsed['pool_id'] == '7'


def test_validate_accepts_a_parsed_spec_and_returns_it() -> None:
    value = spec()
    assert validate_source_spec(value) is value


# -- one error, one line, naming the field ------------------------------------

ERRORS = {
    # format type
    'no type': ({'stream': FILE}, "source-spec: missing required field 'type'"),
    'unknown format': ({'type': 'vhdx'},
                       f"source-spec: type: 'vhdx' is not one of {TYPES}"),
    'format type not a string': ({'type': 5},
                                 f'source-spec: type: expected one of {TYPES}, '
                                 'got an integer'),
    'format type is case-sensitive': ({'type': 'RAW', 'stream': FILE},
                                      f"source-spec: type: 'RAW' is not one of "
                                      f'{TYPES}'),
    # top-level fields
    'raw without stream': ({'type': 'raw'},
                           "source-spec: missing required field 'stream'"),
    'qcow without stream': ({'type': 'qcow'},
                            "source-spec: missing required field 'stream'"),
    'unknown top-level field': (spec(snapshot=[]),
                                'source-spec: snapshot: unknown field (allowed: '
                                'type, stream, snapshots, rbd_migration)'),
    'qcow has no snapshots field': ({'type': 'qcow', 'stream': FILE, 'snapshots': []},
                                    'source-spec: snapshots: unknown field '
                                    '(allowed: type, stream, rbd_migration)'),
    'native has no stream': (native(stream=FILE),
                             'source-spec: stream: unknown field (allowed: type, '
                             'pool_name, pool_id, pool_namespace, image_name, '
                             'image_id, snap_name, snap_id, cluster_name, client_name, '
                             'mon_host, key, rbd_migration)'),
    'unknown extension': (spec(rbd_migration={'speed': 1}),
                          'source-spec: rbd_migration.speed: unknown field '
                          '(allowed: engine, live)'),
    'unknown engine': (spec(rbd_migration={'engine': 'qemu'}),
                       "source-spec: rbd_migration.engine: 'qemu' is not one of "
                       'auto, librbd, adapter'),
    'extension not an object': (spec(rbd_migration=[]),
                                'source-spec: rbd_migration: expected an object, '
                                'got an array'),
    # stream
    'stream not an object': (spec(stream='/mnt/x'),
                             'source-spec: stream: expected an object, got a string'),
    'stream without type': (spec(stream={'file_path': '/x'}),
                            "source-spec: stream: missing required field 'type'"),
    'unknown stream': (spec(stream={'type': 'ftp', 'url': 'ftp://h'}),
                       "source-spec: stream.type: 'ftp' is not one of file, http, nbd, s3"),
    # file
    'file without path': (spec(stream={'type': 'file'}),
                          "source-spec: stream: missing required field 'file_path'"),
    'file path typo': (spec(stream={'type': 'file', 'file_pth': '/x'}),
                       'source-spec: stream.file_pth: unknown field '
                       '(allowed: type, file_path)'),
    'relative file path': (spec(stream={'type': 'file', 'file_path': 'img.raw'}),
                           "source-spec: stream.file_path: 'img.raw' is not an "
                           'absolute path'),
    'empty file path': (spec(stream={'type': 'file', 'file_path': ''}),
                        "source-spec: stream.file_path: '' is not an absolute path"),
    'file path not a string': (spec(stream={'type': 'file', 'file_path': 1}),
                               'source-spec: stream.file_path: expected a string, '
                               'got an integer'),
    'file path with NUL': (spec(stream={'type': 'file', 'file_path': '/a\x00b'}),
                           "source-spec: stream.file_path: '/a\\x00b' is not an "
                           'absolute path'),
    'file path ending in newline': (spec(stream={'type': 'file', 'file_path': 'a\n'}),
                                    "source-spec: stream.file_path: 'a\\n' is not "
                                    'an absolute path'),
    # http
    'http without url': (spec(stream={'type': 'http'}),
                         "source-spec: stream: missing required field 'url'"),
    'http ftp url': (spec(stream={'type': 'http', 'url': 'ftp://x'}),
                     "source-spec: stream.url: 'ftp://x' is not an http(s) URL"),
    'http without scheme': (spec(stream={'type': 'http', 'url': 'host/x'}),
                            "source-spec: stream.url: 'host/x' is not an http(s) URL"),
    'http upper-case scheme': (spec(stream={'type': 'http', 'url': 'HTTP://h/x'}),
                               "source-spec: stream.url: 'HTTP://h/x' is not an "
                               'http(s) URL'),
    'http without host': (spec(stream={'type': 'http', 'url': 'http:///x'}),
                          "source-spec: stream.url: 'http:///x' is not an http(s) URL"),
    'http url with space': (spec(stream={'type': 'http', 'url': 'http://h/a b'}),
                            "source-spec: stream.url: 'http://h/a b' is not an "
                            'http(s) URL'),
    'http url with trailing newline': (spec(stream={'type': 'http', 'url': 'http://h/\n'}),
                                       "source-spec: stream.url: 'http://h/\\n' is "
                                       'not an http(s) URL'),
    'http with s3 keys': (spec(stream=dict(HTTP, access_key='a')),
                          'source-spec: stream.access_key: unknown field '
                          '(allowed: type, url)'),
    # s3
    's3 without secret key': (spec(stream={k: v for k, v in S3.items()
                                            if k != 'secret_key'}),
                              "source-spec: stream: missing required field 'secret_key'"),
    's3 without access key': (spec(stream={k: v for k, v in S3.items()
                                            if k != 'access_key'}),
                              "source-spec: stream: missing required field 'access_key'"),
    's3 url without key': (spec(stream=dict(S3, url='https://s3.example.com/bucket')),
                           "source-spec: stream.url: 'https://s3.example.com/bucket' "
                           'is not an S3 object URL (expected '
                           'http(s)://host[:port]/bucket/key)'),
    's3 url with query': (spec(stream=dict(S3, url='https://h/b/k?versionId=1')),
                          "source-spec: stream.url: 'https://h/b/k?versionId=1' is "
                          'not an S3 object URL (expected '
                          'http(s)://host[:port]/bucket/key)'),
    's3 url as s3://': (spec(stream=dict(S3, url='s3://bucket/key')),
                        "source-spec: stream.url: 's3://bucket/key' is not an S3 "
                        'object URL (expected http(s)://host[:port]/bucket/key)'),
    'empty secret key': (spec(stream=dict(S3, secret_key='')),
                         'source-spec: stream.secret_key: must not be empty'),
    'secret key not a string': (spec(stream=dict(S3, secret_key=12345678)),
                                'source-spec: stream.secret_key: expected a string, '
                                'got an integer'),
    'config reference without key': (spec(stream=dict(S3, access_key='config://')),
                                     "source-spec: stream.access_key: 'config://' "
                                     'must be followed by a config-key name'),
    # raw snapshots
    'snapshots not an array': (spec(snapshots={}),
                               'source-spec: snapshots: expected an array, got an object'),
    'snapshot not an object': (spec(snapshots=['snap1']),
                               'source-spec: snapshots[0]: expected an object, '
                               'got a string'),
    'snapshot without name': (spec(snapshots=[{'type': 'raw', 'stream': FILE}]),
                              "source-spec: snapshots[0]: missing required field 'name'"),
    'snapshot without type': (spec(snapshots=[{'name': 's', 'stream': FILE}]),
                              "source-spec: snapshots[0]: missing required field 'type'"),
    'snapshot of another type': (spec(snapshots=[{'type': 'qcow', 'name': 's',
                                                  'stream': FILE}]),
                                 "source-spec: snapshots[0].type: 'qcow' is not "
                                 "supported: every snapshot must be of type 'raw'"),
    'snapshot with empty name': (spec(snapshots=[{'type': 'raw', 'name': '',
                                                  'stream': FILE}]),
                                 'source-spec: snapshots[0].name: must not be empty'),
    'snapshot stream error': (spec(snapshots=[
        {'type': 'raw', 'name': 'a', 'stream': FILE},
        {'type': 'raw', 'name': 'b', 'stream': {'type': 'http', 'url': 'x'}}]),
        "source-spec: snapshots[1].stream.url: 'x' is not an http(s) URL"),
    'snapshot unknown field': (spec(snapshots=[{'type': 'raw', 'name': 'a',
                                                'stream': FILE, 'size': 1}]),
                               'source-spec: snapshots[0].size: unknown field '
                               '(allowed: type, name, stream)'),
    'duplicate snapshot names': (spec(snapshots=[
        {'type': 'raw', 'name': 'a', 'stream': FILE},
        {'type': 'raw', 'name': 'b', 'stream': FILE},
        {'type': 'raw', 'name': 'a', 'stream': FILE}]),
        "source-spec: snapshots[2].name: 'a' is already the name of snapshots[0]"),
    # native
    'native without pool': (native(pool_name=None),
                            "source-spec: missing required field 'pool_name' or "
                            "'pool_id'"),
    'native with pool name and id': (native(pool_id=1),
                                     "source-spec: give either 'pool_name' or "
                                     "'pool_id', not both"),
    'native without snapshot': (native(snap_name=None),
                                "source-spec: missing required field 'snap_name' or "
                                "'snap_id'"),
    'native with snap name and id': (native(snap_id=1),
                                     "source-spec: give either 'snap_name' or "
                                     "'snap_id', not both"),
    'native without image': (native(image_name=None),
                             "source-spec: missing required field 'image_name'"),
    'native with image id only': (native(image_name=None, image_id='10ab'),
                                  "source-spec: missing required field 'image_name'"),
    'empty pool name': (native(pool_name=''),
                        'source-spec: pool_name: must not be empty'),
    'empty image name': (native(image_name=''),
                         'source-spec: image_name: must not be empty'),
    'empty snap name': (native(snap_name=''),
                        'source-spec: snap_name: must not be empty'),
    'empty image id': (native(image_id=''),
                       'source-spec: image_id: must not be empty'),
    'namespace not a string': (native(pool_namespace=1),
                               'source-spec: pool_namespace: expected a string, '
                               'got an integer'),
    'negative pool id': (native(pool_name=None, pool_id=-1),
                         'source-spec: pool_id: -1 is negative'),
    'pool id as float': (native(pool_name=None, pool_id=3.0),
                         'source-spec: pool_id: expected a pool id (an integer or '
                         'a string of digits), got a number'),
    'pool id as boolean': (native(pool_name=None, pool_id=True),
                           'source-spec: pool_id: expected a pool id (an integer or '
                           'a string of digits), got a boolean'),
    'pool id not numeric': (native(pool_name=None, pool_id='rbd'),
                            "source-spec: pool_id: 'rbd' is not a non-negative integer"),
    'pool id negative string': (native(pool_name=None, pool_id='-1'),
                                "source-spec: pool_id: '-1' is not a non-negative "
                                'integer'),
    'pool id too large': (native(pool_name=None, pool_id=POOL_ID_MAX + 1),
                          f'source-spec: pool_id: {POOL_ID_MAX + 1} is too large '
                          f'(at most {POOL_ID_MAX})'),
    'pool id string too large': (native(pool_name=None, pool_id=str(POOL_ID_MAX + 1)),
                                 f"source-spec: pool_id: '{POOL_ID_MAX + 1}' is too "
                                 f'large (at most {POOL_ID_MAX})'),
    'snap id CEPH_NOSNAP': (native(snap_name=None, snap_id=SNAP_ID_MAX + 1),
                            f'source-spec: snap_id: {SNAP_ID_MAX + 1} is too large '
                            f'(at most {SNAP_ID_MAX})'),
    'snap id string CEPH_NOSNAP': (native(snap_name=None, snap_id=str(SNAP_ID_MAX + 1)),
                                   f"source-spec: snap_id: '{SNAP_ID_MAX + 1}' is too "
                                   f'large (at most {SNAP_ID_MAX})'),
    'snap id with spaces': (native(snap_name=None, snap_id=' 5'),
                            "source-spec: snap_id: ' 5' is not a non-negative integer"),
    'snap id as null': (dict(native(snap_name=None), snap_id=None),
                        'source-spec: snap_id: expected a snapshot id (an integer or '
                        'a string of digits), got null'),
    'snap id unicode digits': (native(snap_name=None, snap_id='\u0665'),
                               "source-spec: snap_id: '\u0665' is not a non-negative "
                               'integer'),
}


@pytest.mark.parametrize('value,message', ERRORS.values(), ids=list(ERRORS))
def test_error_names_the_field_and_the_expectation(value: Any, message: str) -> None:
    assert error_of(value) == message


def test_unknown_field_beats_missing_field_in_the_same_object() -> None:
    # the typo is the cause; "missing file_path" alone would hide it
    assert error_of(spec(stream={'type': 'file', 'filepath': '/x'})) == (
        'source-spec: stream.filepath: unknown field (allowed: type, file_path)')


def test_the_shallowest_error_is_reported() -> None:
    value = spec(stream={'type': 'file', 'file_path': 'rel'}, extra=1)
    assert error_of(value).startswith('source-spec: extra: unknown field')


def test_errors_are_about_the_branch_the_type_names() -> None:
    # an s3 stream missing its keys is not told about file_path
    message = error_of(spec(stream={'type': 's3', 'url': 'http://h/b/k'}))
    assert message == "source-spec: stream: missing required field 'access_key'"


def test_odd_field_names_stay_on_one_line() -> None:
    assert error_of(spec(**{'a\nb': 1})) == (
        "source-spec: ['a\\nb']: unknown field (allowed: type, stream, "
        'snapshots, rbd_migration)')


def test_long_values_are_shortened() -> None:
    message = error_of(spec(stream={'type': 'file', 'file_path': 'x' * 500}))
    assert message == ("source-spec: stream.file_path: '" + 'x' * 57
                       + "...' is not an absolute path")


def test_url_password_is_masked_in_errors() -> None:
    message = error_of(spec(stream={'type': 'http', 'url': 'ftp://u:hunter22@h/x'}))
    assert 'hunter22' not in message
    assert message == "source-spec: stream.url: 'ftp://u:***@h/x' is not an http(s) URL"


def test_signature_is_masked_in_errors() -> None:
    message = error_of(spec(stream=dict(S3, url='https://h/b/k?X-Amz-Signature=abcdef')))
    assert 'abcdef' not in message


# -- JSON that is not a spec -------------------------------------------------

@pytest.mark.parametrize('text,message', [
    ('', 'source-spec: invalid JSON at line 1 column 1: Expecting value'),
    ('{"type": "raw",\n  "stream": {"type": "file"\n}',
     "source-spec: invalid JSON at line 3 column 2: Expecting ',' delimiter"),
    ("{'type': 'raw'}", 'source-spec: invalid JSON at line 1 column 2: Expecting '
                        'property name enclosed in double quotes'),
    ('{"type": "raw"} x', 'source-spec: invalid JSON at line 1 column 17: Extra data'),
    ('{"type": "raw", "type": "qcow"}',
     "source-spec: invalid JSON: field 'type' appears twice in one object"),
    ('{"type": "native", "pool_id": NaN}', 'source-spec: invalid JSON: NaN is not '
                                           'valid JSON'),
    ('{"pool_id": -Infinity}', 'source-spec: invalid JSON: -Infinity is not valid JSON'),
    ('{"pool_id": ' + '9' * 5000 + '}',
     'source-spec: invalid JSON: integer 999999999999... has too many digits'),
    ('[' * 100000, 'source-spec: invalid JSON: nested too deeply'),
])
def test_malformed_json(text: str, message: str) -> None:
    assert error_of(text) == message


@pytest.mark.parametrize('text,kind', [
    ('[]', 'an array'), ('"raw"', 'a string'), ('5', 'an integer'),
    ('1.5', 'a number'), ('true', 'a boolean'), ('null', 'null'),
])
def test_spec_must_be_an_object(text: str, kind: str) -> None:
    assert error_of(text) == f'source-spec: expected a JSON object, got {kind}'


# -- summaries ---------------------------------------------------------------

@pytest.mark.parametrize('value,summary', [
    (native(), 'native rbd/img@snap1'),
    (native(pool_namespace='ns1'), 'native rbd/ns1/img@snap1'),
    (native(pool_name=None, pool_id='3', snap_name=None, snap_id=12),
     'native pool#3/img@snap#12'),
    (native(image_id='10ab'), 'native rbd/img@snap1 (image id 10ab)'),
    (spec(), 'raw over file /mnt/image.raw'),
    ({'type': 'qcow', 'stream': HTTP}, 'qcow over http https://images.example.com/disk.img'),
    (spec(stream=S3), 'raw over s3 http://s3.example.com:8080/bucket/dir/disk.img'),
    (spec(snapshots=[{'type': 'raw', 'name': 'a', 'stream': FILE}]),
     'raw over file /mnt/image.raw with 1 snapshot'),
    (spec(snapshots=[{'type': 'raw', 'name': n, 'stream': FILE} for n in 'ab']),
     'raw over file /mnt/image.raw with 2 snapshots'),
    (spec(stream={'type': 'http',
                  'url': 'https://u:pw@h/d.img?X-Amz-Signature=abc&part=1'}),
     'raw over http https://u:***@h/d.img?X-Amz-Signature=***&part=1'),
    (spec(stream={'type': 'file', 'file_path': '/mnt/a\nb'}),
     "raw over file '/mnt/a\\nb'"),
    ({'type': 'raw'}, 'raw without a stream'),
])
def test_spec_summary(value: Dict[str, Any], summary: str) -> None:
    assert spec_summary(value) == summary


def test_summary_never_shows_credentials() -> None:
    assert S3['secret_key'] not in spec_summary(spec(stream=S3))
    assert S3['access_key'] not in spec_summary(spec(stream=S3))


# -- properties --------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

# Documents shaped like specs: each field is either a good value or any
# LEAF, so that most examples get past the first checks and exercise the
# branches, ids, URLs and snapshots.
LEAF = (st.sampled_from(['raw', 'file', 'rel', 'ftp://u:p@h', 'config://', '',
                         '-1', ' 7', '18446744073709551614', 'x' * 100])
        | st.integers(min_value=-2, max_value=2**64) | st.none() | st.booleans()
        | st.floats(allow_nan=False, allow_infinity=False))


def field(*good: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(good) | LEAF


EXTRA = {'extra': LEAF}
STREAM_LIKE = st.one_of(
    st.fixed_dictionaries({'type': st.just('file'), 'file_path': field('/mnt/x')},
                          optional=EXTRA),
    st.fixed_dictionaries({'type': st.just('http'),
                           'url': field('http://h/x', 'https://u:p@h:1/x?sig=1')},
                          optional=EXTRA),
    st.fixed_dictionaries({'type': field('s3'), 'url': field('http://h/b/k'),
                           'access_key': field('config://a', 'AKIAXXXX'),
                           'secret_key': field('config://s', 'secretsecret')},
                          optional=EXTRA))
SNAPSHOT_LIKE = st.fixed_dictionaries(
    {'type': field('raw'), 'name': field('a', 'b'), 'stream': STREAM_LIKE | LEAF})
EXTENSIONS = st.dictionaries(st.text(max_size=3), LEAF, max_size=1) | LEAF
SPEC_LIKE = st.one_of(
    st.fixed_dictionaries(
        {'type': st.just('raw'), 'stream': STREAM_LIKE | LEAF},
        optional={'snapshots': st.lists(SNAPSHOT_LIKE | LEAF, max_size=3) | LEAF,
                  'rbd_migration': EXTENSIONS}),
    st.fixed_dictionaries(
        {'type': st.just('qcow'), 'stream': STREAM_LIKE | LEAF},
        optional={'rbd_migration': EXTENSIONS}),
    st.fixed_dictionaries(
        {'type': st.just('native'), 'image_name': field('img')},
        optional={'pool_name': field('rbd'), 'pool_id': field(0, '3'),
                  'pool_namespace': field('ns'), 'image_id': field('10ab'),
                  'snap_name': field('s'), 'snap_id': field(1, '2'),
                  'rbd_migration': EXTENSIONS}))


def assert_parses_or_explains(text: str) -> None:
    try:
        result = parse_source_spec(text)
    except InvalidArgument as e:
        message = str(e)
        assert message.startswith('source-spec: ')
        assert len(message.splitlines()) == 1 and '\n' not in message
    else:
        assert isinstance(result, dict)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_value_parses_or_is_explained(value: Any) -> None:
    assert_parses_or_explains(json.dumps(value))


@settings(max_examples=500, deadline=None)
@given(SPEC_LIKE)
def test_spec_like_documents_parse_or_are_explained(value: Any) -> None:
    assert_parses_or_explains(json.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_parses_or_is_explained(text: str) -> None:
    assert_parses_or_explains(text)


# -- export and export-diff ----------------------------------------------------

DIFF = dict(FILE, file_path='/mnt/s2.diff')
EXPORT_VALID = {
    'export over file': {'type': 'export', 'stream': dict(FILE, file_path='/mnt/img.exp')},
    'export over s3 with engine': {'type': 'export', 'stream': S3,
                                   'rbd_migration': {'engine': 'adapter'}},
    'export-diff base only': {'type': 'export-diff', 'stream': FILE},
    'export-diff named base': {'type': 'export-diff', 'stream': FILE, 'name': 's1'},
    'export-diff with diffs': {'type': 'export-diff', 'stream': FILE, 'diffs': [
        {'stream': DIFF}, {'name': 's3', 'stream': HTTP}, {'stream': S3}]},
    'export-diff with no diffs': {'type': 'export-diff', 'stream': FILE, 'diffs': []},
}


@pytest.mark.parametrize('value', EXPORT_VALID.values(), ids=list(EXPORT_VALID))
def test_valid_export_specs_are_returned_as_written(value: Dict[str, Any]) -> None:
    assert parse_source_spec(json.dumps(value)) == value


def test_diff_items_are_closed() -> None:
    items = FORMATS['export-diff']['properties']['diffs']['items']
    assert items['additionalProperties'] is False
    assert items['required'] == ['stream']


EXPORT_ERRORS = {
    'export without stream': ({'type': 'export'},
                              "source-spec: missing required field 'stream'"),
    'export has no snapshots': ({'type': 'export', 'stream': FILE, 'snapshots': []},
                                'source-spec: snapshots: unknown field (allowed: '
                                'type, stream, rbd_migration)'),
    'export stream error': ({'type': 'export', 'stream': {'type': 'file',
                                                          'file_path': 'x'}},
                            "source-spec: stream.file_path: 'x' is not an absolute path"),
    'export-diff without stream': ({'type': 'export-diff', 'diffs': []},
                                   "source-spec: missing required field 'stream'"),
    'export-diff unknown field': ({'type': 'export-diff', 'stream': FILE, 'snapshots': []},
                                  'source-spec: snapshots: unknown field (allowed: '
                                  'type, stream, name, diffs, rbd_migration)'),
    'export-diff empty name': ({'type': 'export-diff', 'stream': FILE, 'name': ''},
                               'source-spec: name: must not be empty'),
    'export-diff name not a string': ({'type': 'export-diff', 'stream': FILE, 'name': 1},
                                      'source-spec: name: expected a string, got an '
                                      'integer'),
    'diffs not an array': ({'type': 'export-diff', 'stream': FILE, 'diffs': DIFF},
                           'source-spec: diffs: expected an array, got an object'),
    'diff not an object': ({'type': 'export-diff', 'stream': FILE, 'diffs': ['/x']},
                           'source-spec: diffs[0]: expected an object, got a string'),
    'diff without stream': ({'type': 'export-diff', 'stream': FILE,
                             'diffs': [{'stream': DIFF}, {'name': 's3'}]},
                            "source-spec: diffs[1]: missing required field 'stream'"),
    'diff unknown field': ({'type': 'export-diff', 'stream': FILE,
                            'diffs': [{'stream': DIFF, 'from': 's1'}]},
                           'source-spec: diffs[0].from: unknown field (allowed: '
                           'name, stream)'),
    'diff with a type': ({'type': 'export-diff', 'stream': FILE,
                          'diffs': [{'type': 'raw', 'stream': DIFF}]},
                         'source-spec: diffs[0].type: unknown field (allowed: '
                         'name, stream)'),
    'diff empty name': ({'type': 'export-diff', 'stream': FILE,
                         'diffs': [{'name': '', 'stream': DIFF}]},
                        'source-spec: diffs[0].name: must not be empty'),
    'diff stream error': ({'type': 'export-diff', 'stream': FILE,
                           'diffs': [{'stream': {'type': 'http', 'url': 'x'}}]},
                          "source-spec: diffs[0].stream.url: 'x' is not an http(s) URL"),
}


@pytest.mark.parametrize('value,message', EXPORT_ERRORS.values(), ids=list(EXPORT_ERRORS))
def test_export_errors_name_the_field(value: Any, message: str) -> None:
    assert error_of(value) == message


def test_export_types_are_listed_in_type_errors() -> None:
    assert error_of({'type': 'exports'}).startswith(
        "source-spec: type: 'exports' is not one of export, export-diff, ")


@pytest.mark.parametrize('value,summary', [
    ({'type': 'export', 'stream': FILE}, 'export over file /mnt/image.raw'),
    ({'type': 'export-diff', 'stream': FILE, 'diffs': [{'stream': DIFF}]},
     'export-diff over file /mnt/image.raw'),
])
def test_export_summary(value: Dict[str, Any], summary: str) -> None:
    assert spec_summary(value) == summary


EXPORT_DIFF_LIKE = st.fixed_dictionaries(
    {'type': st.just('export-diff'), 'stream': STREAM_LIKE | LEAF},
    optional={'name': field('s1'),
              'diffs': st.lists(st.fixed_dictionaries(
                  {'stream': STREAM_LIKE | LEAF},
                  optional={'name': field('s2'), 'extra': LEAF}) | LEAF,
                  max_size=3) | LEAF,
              'rbd_migration': EXTENSIONS})


@settings(max_examples=300, deadline=None)
@given(EXPORT_DIFF_LIKE | st.fixed_dictionaries(
    {'type': st.just('export'), 'stream': STREAM_LIKE | LEAF},
    optional={'rbd_migration': EXTENSIONS, 'snapshots': LEAF}))
def test_export_like_documents_parse_or_are_explained(value: Any) -> None:
    assert_parses_or_explains(json.dumps(value))


@pytest.mark.parametrize('extra,message', [
    ({'mon_host': 'h'}, "source-spec: 'mon_host' needs 'key'"),
    ({'key': 'AQ=='}, "source-spec: 'key' needs 'mon_host'"),
    ({'client_name': 'client.a'},
     "source-spec: missing required field 'cluster_name' or 'mon_host'"),
    ({'cluster_name': 'a', 'mon_host': 'h', 'key': 'k'},
     "source-spec: give either 'cluster_name' or 'mon_host', not both"),
    ({'cluster_name': '../etc/ceph'},
     "source-spec: cluster_name: '../etc/ceph' is not a cluster name (letters, digits, _ "
     "and -)"),
    ({'cluster_name': 'old', 'client_name': 'admin'},
     "source-spec: client_name: 'admin' is not a client name (expected 'client.<id>')"),
])
def test_another_cluster_takes_one_of_two_forms(extra: Dict[str, Any], message: str) -> None:
    """Upstream's fields for a native source in another cluster: the conf
    and keyring of a named cluster, or monitors and a key, never both."""
    spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': 'x', 'snap_name': 's',
            **extra}
    with pytest.raises(InvalidArgument) as caught:
        parse_source_spec(json.dumps(spec))
    assert str(caught.value) == message


def test_another_clusters_forms_pass() -> None:
    for extra in ({'cluster_name': 'old'}, {'cluster_name': 'old', 'client_name': 'client.mig'},
                  {'mon_host': '[v2:10.0.0.5:3300]', 'key': 'config://rbd/old/key'}):
        spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': 'x', 'snap_name': 's',
                **extra}
        assert parse_source_spec(json.dumps(spec))['type'] == 'native'
