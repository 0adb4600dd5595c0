"""Secrets in source-specs: resolving ``config://`` references and masking.

An S3 source-spec carries credentials, and HTTP(S) URLs may carry a password
or a presigned signature.  The spec itself is stored by librbd and shown by
``rbd status``, so operators are encouraged to use ``config://<key>``
references into the mon config-key store; those references are not secret
and stay visible.  Everything else that grants access is masked before it
reaches a message, a log line or a health warning.
"""
import copy
import re
from typing import Any, Callable, Iterable, Optional
from urllib.parse import quote, unquote

from .errors import NotFound, PermissionDenied

#: librbd's prefix for a value read from the mon config-key store.
CONFIG_PREFIX = 'config://'
#: Fields whose value is a credential (an S3 stream's keys, another cluster's
#: key); config:// is resolved in them, and they are masked wherever they appear.
SECRET_FIELDS = frozenset({'access_key', 'secret_key', 'key'})
#: Shown in place of a secret.
MASK = '***'
#: Shorter values are not treated as secrets by ``collect_secrets`` and
#: ``mask_text``: masking every ``a`` or ``1`` would make messages useless.
MIN_SECRET_LEN = 4
#: Query parameters that sign or authorise a URL (AWS SigV2/SigV4 presigned
#: URLs, GCS signed URLs, Azure SAS, generic tokens); compared case-blind.
SIGNED_QUERY_PARAMS = frozenset(p.lower() for p in (
    'X-Amz-Signature', 'X-Amz-Credential', 'X-Amz-Security-Token',
    'X-Goog-Signature', 'X-Goog-Credential',
    'Signature', 'AWSAccessKeyId', 'sig', 'token',
))

# scheme://user:password@ -- the password runs to the last '@' of the
# authority, so a raw '@' inside it is masked too.
_USERINFO_RE = re.compile(
    r'(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*):'
    r'(?P<password>[^\s/?#]*)@')
# name=value for the signing parameters, wherever it stands in a text.
_SIGNED_PARAM_RE = re.compile(
    r'(?<![\w-])(?P<name>'
    + '|'.join(sorted(map(re.escape, SIGNED_QUERY_PARAMS)))
    + r')=(?P<value>[^&;#\s\'"]*)', re.IGNORECASE)


def is_config_ref(value: object) -> bool:
    """True for a ``config://<key>`` reference (not itself a secret)."""
    return isinstance(value, str) and value.startswith(CONFIG_PREFIX)


def resolve_secrets(
        spec: dict[str, Any],
        config_key: Callable[[str], Optional[str]]) -> dict[str, Any]:
    """A deep copy of ``spec`` with every ``config://`` credential replaced by
    its value from the config-key store, at any depth (the HEAD stream and
    each raw snapshot's stream).

    Raises NotFound naming the field and the command that fixes it when a
    referenced key does not exist.
    """
    resolved = copy.deepcopy(spec)
    _resolve_in(resolved, '', config_key)
    return resolved


def _resolve_in(node: Any, path: str,
                config_key: Callable[[str], Optional[str]]) -> None:
    if isinstance(node, list):
        for index, item in enumerate(node):
            _resolve_in(item, f'{path}[{index}]', config_key)
        return
    if not isinstance(node, dict):
        return
    for field, value in node.items():
        where = f'{path}.{field}' if path else field
        if field in SECRET_FIELDS and is_config_ref(value):
            key = value[len(CONFIG_PREFIX):]
            try:
                secret = config_key(key)
            except PermissionDenied as e:
                raise PermissionDenied(f'source-spec: {where}: {e}') from None
            if secret is None:
                raise NotFound(
                    f"source-spec: {where}: config-key '{key}' not found; "
                    f"set it with ceph config-key set {key} <value>")
            node[field] = secret
        else:
            _resolve_in(value, where, config_key)


def mask_url(url: str) -> str:
    """``url`` with its userinfo password and signing query parameters
    masked; anything that is not ``scheme://...`` is returned unchanged."""
    if not re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', url):
        return url
    url = _USERINFO_RE.sub(lambda m: f"{m['head']}:{MASK}@", url, count=1)
    base, question, rest = url.partition('?')
    if not question:
        return url
    query, hash_, fragment = rest.partition('#')
    query = _SIGNED_PARAM_RE.sub(lambda m: f"{m['name']}={MASK}", query)
    return f'{base}?{query}{hash_}{fragment}'


def mask_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``spec`` fit to show: credentials replaced by ``***``
    unless they are ``config://`` references, URL passwords and signatures
    masked in every string."""
    return {field: _mask_node(field, value) for field, value in spec.items()}


def _mask_node(field: Optional[str], value: Any) -> Any:
    if field in SECRET_FIELDS:
        return value if is_config_ref(value) else MASK
    if isinstance(value, dict):
        return {k: _mask_node(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_node(None, v) for v in value]
    if isinstance(value, str):
        return mask_url(value)
    return value


def collect_secrets(spec: dict[str, Any]) -> set[str]:
    """Literal secret values in ``spec`` (a resolved spec included): the
    credentials, URL passwords and signatures, each also percent-decoded;
    values shorter than MIN_SECRET_LEN are left out."""
    found: set[str] = set()
    _collect(None, spec, found)
    return {s for s in found if len(s) >= MIN_SECRET_LEN}


def _collect(field: Optional[str], value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _collect(k, v, found)
    elif isinstance(value, list):
        for v in value:
            _collect(None, v, found)
    elif isinstance(value, str):
        if field in SECRET_FIELDS:
            if not is_config_ref(value):
                found.add(value)
            return
        pieces = [m['password'] for m in _USERINFO_RE.finditer(value)]
        pieces += [m['value'] for m in _SIGNED_PARAM_RE.finditer(value)]
        for piece in pieces:
            found.update((piece, unquote(piece)))


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` (an exception, a log line, a health message) with every
    occurrence of a known secret -- verbatim or percent-encoded -- and every
    URL password or signature replaced by ``***``.

    Overlapping occurrences of different secrets are masked as one run, so
    no fragment of either survives.
    """
    needles = {variant for secret in secrets if len(secret) >= MIN_SECRET_LEN
               for variant in (secret, quote(secret, safe=''))}
    covered = [False] * len(text)
    for needle in needles:
        start = text.find(needle)
        while start >= 0:
            covered[start:start + len(needle)] = [True] * len(needle)
            start = text.find(needle, start + 1)
    if any(covered):
        out: list[str] = []
        for index, char in enumerate(text):
            if not covered[index]:
                out.append(char)
            elif index == 0 or not covered[index - 1]:
                out.append(MASK)
        text = ''.join(out)
    text = _USERINFO_RE.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _SIGNED_PARAM_RE.sub(lambda m: f"{m['name']}={MASK}", text)
