"""Resolving config:// credentials and keeping secrets out of messages."""
import copy
import errno
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd_migration.errors import NotFound
from rbd_migration.secrets import (CONFIG_PREFIX, MASK, collect_secrets,
                                   mask_spec, mask_text, mask_url,
                                   resolve_secrets)

ACCESS = 'NX5QOQKC6BH2IDN8HC7A'
SECRET = 'LnEsqNNqZIpkzauboDcLXLcYaWwLQ3Kop0zAnKIn'


def s3(access_key: str = ACCESS, secret_key: str = SECRET) -> Dict[str, Any]:
    return {'type': 's3', 'url': 'https://s3.example.com/bucket/disk.raw',
            'access_key': access_key, 'secret_key': secret_key}


def raw(stream: Dict[str, Any], *snapshot_streams: Dict[str, Any]) -> Dict[str, Any]:
    spec: Dict[str, Any] = {'type': 'raw', 'stream': stream}
    if snapshot_streams:
        spec['snapshots'] = [{'type': 'raw', 'name': f'snap{i}', 'stream': s}
                             for i, s in enumerate(snapshot_streams)]
    return spec


class Store:
    """A config-key store that records what was asked of it."""

    def __init__(self, **values: str) -> None:
        self.values = {k.replace('__', '/'): v for k, v in values.items()}
        self.asked: List[str] = []

    def __call__(self, key: str) -> Optional[str]:
        self.asked.append(key)
        return self.values.get(key)


# -- resolve_secrets ---------------------------------------------------------

def test_config_prefix_is_librbds() -> None:
    assert CONFIG_PREFIX == 'config://'


def test_resolve_replaces_references_in_stream_and_snapshot_streams() -> None:
    spec = raw(s3('config://rbd/s3/access', 'config://rbd/s3/secret'),
               s3('config://rbd/s3/access', 'literal-secret'))
    store = Store(rbd__s3__access='AKIA1234', rbd__s3__secret='s3cr3t!')
    resolved = resolve_secrets(spec, store)
    assert resolved['stream']['access_key'] == 'AKIA1234'
    assert resolved['stream']['secret_key'] == 's3cr3t!'
    assert resolved['snapshots'][0]['stream']['access_key'] == 'AKIA1234'
    assert resolved['snapshots'][0]['stream']['secret_key'] == 'literal-secret'
    assert sorted(store.asked) == ['rbd/s3/access', 'rbd/s3/access', 'rbd/s3/secret']


def test_resolve_returns_a_copy() -> None:
    spec = raw(s3('config://a', 'config://b'))
    before = copy.deepcopy(spec)
    resolved = resolve_secrets(spec, Store(a='AAAA', b='BBBB'))
    assert spec == before
    resolved['stream']['url'] = 'changed'
    assert spec['stream']['url'] == before['stream']['url']


def test_resolve_leaves_literals_and_other_fields_alone() -> None:
    spec = raw(s3())
    spec['stream']['url'] = 'config://not-a-credential'
    store = Store()
    assert resolve_secrets(spec, store) == spec
    assert store.asked == []


def test_resolve_missing_key_names_field_and_fix() -> None:
    spec = raw(s3('config://rbd/s3/access', 'config://rbd/s3/secret'))
    with pytest.raises(NotFound) as caught:
        resolve_secrets(spec, Store(rbd__s3__access='AKIA1234'))
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value) == (
        "source-spec: stream.secret_key: config-key 'rbd/s3/secret' not found; "
        'set it with ceph config-key set rbd/s3/secret <value>')


def test_resolve_missing_key_in_a_snapshot_names_the_snapshot() -> None:
    spec = raw(s3(), s3(), s3('config://rbd/old-access'))
    with pytest.raises(NotFound, match=r'^source-spec: snapshots\[1\]\.stream\.'
                                       r"access_key: config-key 'rbd/old-access' "
                                       'not found;'):
        resolve_secrets(spec, Store())


def test_resolve_accepts_an_empty_value() -> None:
    resolved = resolve_secrets(raw(s3('config://k')), Store(k=''))
    assert resolved['stream']['access_key'] == ''


# -- mask_url ------------------------------------------------------------------

@pytest.mark.parametrize('url,masked', [
    ('https://user:pass@host/x', 'https://user:***@host/x'),
    ('https://user:p@ss:w0rd@host:8080/x', 'https://user:***@host:8080/x'),
    ('http://:pass@host', 'http://:***@host'),
    ('https://user@host/x', 'https://user@host/x'),
    ('https://host:8080/x', 'https://host:8080/x'),
    ('https://h/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024'
     '&X-Amz-Signature=deadbeef&X-Amz-Expires=60',
     'https://h/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***'
     '&X-Amz-Signature=***&X-Amz-Expires=60'),
    ('https://h/k?AWSAccessKeyId=AKIA&Signature=abc%3D&Expires=1',
     'https://h/k?AWSAccessKeyId=***&Signature=***&Expires=1'),
    ('https://h/k?x-amz-signature=abc', 'https://h/k?x-amz-signature=***'),
    ('https://h/k?sv=2020&sig=abc#frag', 'https://h/k?sv=2020&sig=***#frag'),
    ('https://h/k?token=abc;other=1', 'https://h/k?token=***;other=1'),
    ('https://h/k?mytoken=abc&sigma=2', 'https://h/k?mytoken=abc&sigma=2'),
    ('https://h/token=abc/k', 'https://h/token=abc/k'),
    ('/mnt/a:b@c?sig=1', '/mnt/a:b@c?sig=1'),
    ('', ''),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


# -- mask_spec -----------------------------------------------------------------

def test_mask_spec_masks_credentials_at_any_depth() -> None:
    spec = raw(s3(), s3('AKIAOTHER', 'other-secret'))
    masked = mask_spec(spec)
    for stream in (masked['stream'], masked['snapshots'][0]['stream']):
        assert stream['access_key'] == MASK
        assert stream['secret_key'] == MASK
        assert stream['url'] == 'https://s3.example.com/bucket/disk.raw'
    assert spec['stream']['secret_key'] == SECRET  # the input is untouched


def test_mask_spec_shows_config_references() -> None:
    masked = mask_spec(raw(s3('config://rbd/a', SECRET)))
    assert masked['stream']['access_key'] == 'config://rbd/a'
    assert masked['stream']['secret_key'] == MASK


def test_mask_spec_masks_url_passwords_and_signatures() -> None:
    spec = raw({'type': 'http', 'url': 'https://u:pw1234@h/d?X-Amz-Signature=ab12'},
               {'type': 'http', 'url': 'http://h/d?sig=zz99&keep=1'})
    masked = mask_spec(spec)
    assert masked['stream']['url'] == 'https://u:***@h/d?X-Amz-Signature=***'
    assert masked['snapshots'][0]['stream']['url'] == 'http://h/d?sig=***&keep=1'


def test_mask_spec_masks_odd_credential_values() -> None:
    spec = raw({'type': 's3', 'url': 'http://h/b/k', 'access_key': 1234,
                'secret_key': {'nested': SECRET}})
    masked = mask_spec(spec)
    assert masked['stream']['access_key'] == MASK
    assert masked['stream']['secret_key'] == MASK


def test_mask_spec_keeps_everything_else() -> None:
    spec = {'type': 'native', 'pool_id': 3, 'image_name': 'img',
            'snap_name': 'a:b@c', 'rbd_migration': {'x': [1, None, True]}}
    assert mask_spec(spec) == spec


# -- collect_secrets -------------------------------------------------------------

def test_collect_secrets_finds_credentials_passwords_and_signatures() -> None:
    spec = raw(s3(), {'type': 'http', 'url': 'https://u:pass%40word@h/x?Signature=sig%2Bvalue'},
               s3('config://rbd/a', 'short'))
    assert collect_secrets(spec) == {
        ACCESS, SECRET, 'pass%40word', 'pass@word', 'sig%2Bvalue', 'sig+value',
        'short'}


def test_collect_secrets_skips_references_and_short_values() -> None:
    spec = raw(s3('config://rbd/a', 'abc'),
               {'type': 'http', 'url': 'https://u:pw@h/x?sig='})
    assert collect_secrets(spec) == set()


def test_collect_secrets_finds_resolved_values() -> None:
    spec = raw(s3('config://a', 'config://b'))
    resolved = resolve_secrets(spec, Store(a='AKIARESOLVED', b='resolved-secret'))
    assert collect_secrets(spec) == set()
    assert collect_secrets(resolved) == {'AKIARESOLVED', 'resolved-secret'}


# -- mask_text -------------------------------------------------------------------

def test_mask_text_replaces_every_occurrence() -> None:
    text = f'auth failed for {ACCESS} with {SECRET}; retrying {SECRET}'
    assert mask_text(text, {ACCESS, SECRET}) == (
        'auth failed for *** with ***; retrying ***')


def test_mask_text_replaces_percent_encoded_secrets() -> None:
    assert mask_text('GET /x?key=a%2Fb%2Bc', ['a/b+c']) == 'GET /x?key=***'


def test_mask_text_masks_overlapping_secrets_as_one_run() -> None:
    assert mask_text('xxabcdefyy', ['abcd', 'cdef']) == 'xx***yy'
    assert mask_text('abcdef', ['abcdef', 'bcd']) == '***'


def test_mask_text_ignores_short_and_empty_values() -> None:
    assert mask_text('a b abc', ['', 'a', 'abc']) == 'a b abc'


def test_mask_text_masks_urls_in_free_text() -> None:
    text = ("error reading 'https://admin:hunter22@h/disk?X-Amz-Signature=f00d"
            "&part=2': 403; token=abcd")
    assert mask_text(text, []) == (
        "error reading 'https://admin:***@h/disk?X-Amz-Signature=***&part=2': "
        '403; token=***')


def test_masked_spec_text_contains_no_secret() -> None:
    spec = raw(s3(), {'type': 'http', 'url': 'https://u:pw-9876@h/x?sig=5ig5ig'})
    text = f'failed to open {spec}'
    masked = mask_text(text, collect_secrets(spec))
    for secret in (ACCESS, SECRET, 'pw-9876', '5ig5ig'):
        assert secret not in masked
    assert 'https://s3.example.com/bucket/disk.raw' in masked


SECRET_TEXT = st.text(min_size=4, max_size=20).filter(lambda s: s.strip() == s)


@settings(max_examples=200, deadline=None)
@given(st.lists(SECRET_TEXT, min_size=1, max_size=3), st.text(max_size=30),
       st.text(max_size=30))
def test_known_secrets_never_survive_mask_text(secrets: List[str], before: str,
                                               after: str) -> None:
    text = before + ' '.join(secrets) + after
    masked = mask_text(text, secrets)
    for secret in secrets:
        assert secret not in masked
