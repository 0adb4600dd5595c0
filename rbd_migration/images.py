"""Image specs and the layout options of ``rbd create``, parsed and checked
before anything touches the cluster, so that bad input fails with a message
naming the argument instead of an errno from librbd."""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import rbd

from .errors import InvalidArgument

DEFAULT_POOL = 'rbd'

# No NUL: librbd takes names as C strings, so 'img\x00x' would name 'img'.
_NAME = re.compile(r'^[^/@\s\x00]+$')


def _shown(value: object, quoted: bool = True) -> str:
    """Operator input as quoted in a message, kept on one line: escaped
    (repr) when it holds a newline or another unprintable character."""
    text = str(value)
    if not text.isprintable():
        return repr(text)
    return f"'{text}'" if quoted else text


@dataclass(frozen=True)
class ImageSpec:
    pool: str
    namespace: str
    name: str

    def __str__(self) -> str:
        ns = f'{self.namespace}/' if self.namespace else ''
        return f'{self.pool}/{ns}{self.name}'

    @classmethod
    def parse(cls, text: str, what: str = 'image_spec') -> 'ImageSpec':
        """``[pool/[namespace/]]image``, as the rbd CLI takes it."""
        given = (text or '').strip().split('/')
        parts = {1: [DEFAULT_POOL, '', *given], 2: [given[0], '', *given[1:]]}.get(
            len(given), given)
        if len(parts) != 3 or not all(_NAME.match(p) for p in given):
            raise InvalidArgument(
                f"{what}: {_shown(text)} is not [pool/[namespace/]]image")
        return cls(*parts)


# Feature names as `rbd create --image-feature` takes them.
FEATURES: Dict[str, int] = {
    'layering': rbd.RBD_FEATURE_LAYERING,
    'striping': rbd.RBD_FEATURE_STRIPINGV2,
    'exclusive-lock': rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    'object-map': rbd.RBD_FEATURE_OBJECT_MAP,
    'fast-diff': rbd.RBD_FEATURE_FAST_DIFF,
    'deep-flatten': rbd.RBD_FEATURE_DEEP_FLATTEN,
    'journaling': rbd.RBD_FEATURE_JOURNALING,
}

# Features that librbd refuses without another (rbd create's rules).
FEATURE_NEEDS = {'object-map': 'exclusive-lock', 'fast-diff': 'object-map',
                 'journaling': 'exclusive-lock'}

MIN_ORDER, MAX_ORDER = 12, 25  # 4 KiB .. 32 MiB objects, as librbd allows

_UNITS = {'': 1, 'B': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def parse_size(text: str, what: str) -> int:
    """Bytes from ``4096``, ``4K``, ``8M``, ``8MiB``."""
    m = re.fullmatch(r'\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*', str(text).upper())
    if not m:
        raise InvalidArgument(f"{what}: {_shown(text)} is not a size (e.g. 4M, 65536)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class Layout:
    """The target's layout; None leaves the choice to librbd (the source's
    layout for in-cluster moves, pool defaults for imports)."""

    order: Optional[int] = None
    features: Optional[int] = None
    stripe_unit: Optional[int] = None
    stripe_count: Optional[int] = None
    data_pool: Optional[str] = None
    flatten: bool = False
    feature_names: List[str] = field(default_factory=list)

    @classmethod
    def parse(cls, object_size: Optional[str] = None, order: Optional[int] = None,
              features: Optional[str] = None, stripe_unit: Optional[str] = None,
              stripe_count: Optional[int] = None, data_pool: Optional[str] = None,
              flatten: bool = False) -> 'Layout':
        layout = cls(data_pool=data_pool or None, flatten=bool(flatten))
        if object_size is not None and order is not None:
            raise InvalidArgument('--object-size and --order: give one of them')
        if object_size is not None:
            size = parse_size(object_size, '--object-size')
            if not _power_of_two(size):
                raise InvalidArgument(
                    f"--object-size: {_shown(object_size, False)} is not a power of two")
            order = size.bit_length() - 1
            if not MIN_ORDER <= order <= MAX_ORDER:
                raise InvalidArgument(
                    f'--object-size: {_shown(object_size, False)} is outside 4K..32M')
        if order is not None and not MIN_ORDER <= order <= MAX_ORDER:
            raise InvalidArgument(
                f'--order: {order} is outside {MIN_ORDER}..{MAX_ORDER} '
                '(4 KiB..32 MiB objects)')
        layout.order = order
        if features is not None:
            layout.feature_names = [f.strip() for f in features.split(',') if f.strip()]
            unknown = [f for f in layout.feature_names if f not in FEATURES]
            if unknown:
                raise InvalidArgument(
                    f"--features: unknown feature {_shown(unknown[0])} (known: "
                    f"{', '.join(FEATURES)})")
            if 'layering' not in layout.feature_names:
                raise InvalidArgument(
                    '--features: a migration target needs layering; add it '
                    '(e.g. --features layering,exclusive-lock)')
            missing = [(f, need) for f, need in FEATURE_NEEDS.items()
                       if f in layout.feature_names and need not in layout.feature_names]
            if missing:
                f, need = missing[0]
                raise InvalidArgument(f'--features: {f} needs {need}; add it')
            layout.features = 0
            for name in layout.feature_names:
                layout.features |= FEATURES[name]
        if stripe_unit is not None:
            unit = parse_size(stripe_unit, '--stripe-unit')
            if unit < 512 or not _power_of_two(unit):
                raise InvalidArgument(
                    f'--stripe-unit: {_shown(stripe_unit, False)} must be a power of two '
                    'of at least 512')
            if order is not None and unit > (1 << order):
                raise InvalidArgument(
                    f'--stripe-unit: {_shown(stripe_unit, False)} is larger than the '
                    'object size')
            layout.stripe_unit = unit
        if stripe_count is not None:
            if stripe_count < 1:
                raise InvalidArgument(f'--stripe-count: {stripe_count} must be at least 1')
            layout.stripe_count = stripe_count
        if (layout.stripe_unit is None) != (layout.stripe_count is None):
            raise InvalidArgument('--stripe-unit and --stripe-count go together; give both')
        return layout

    def check_stripe(self, inherited_order: int, whose: str) -> None:
        """librbd refuses a stripe unit that does not divide the object
        size with a bare EINVAL; the object size is only known here when
        the target inherits it (the source's, or the pool's default)."""
        if self.stripe_unit is None:
            return
        order = self.order if self.order is not None else inherited_order
        if self.stripe_unit > (1 << order):
            raise InvalidArgument(
                f'--stripe-unit: {self.stripe_unit} is larger than the object size '
                f'({1 << order}, {whose}); give a smaller --stripe-unit or a larger '
                '--object-size')

    def librbd_kwargs(self) -> Dict[str, object]:
        """Keyword arguments for ``RBD.migration_prepare[_import]``."""
        kw: Dict[str, object] = {}
        for key in ('features', 'order', 'stripe_unit', 'stripe_count', 'data_pool'):
            value = getattr(self, key)
            if value is not None:
                kw[key] = value
        return kw

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        if self.order is not None:
            out['object_size'] = 1 << self.order
        if self.feature_names:
            out['features'] = self.feature_names
        for key in ('stripe_unit', 'stripe_count', 'data_pool'):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.flatten:
            out['flatten'] = True
        return out
