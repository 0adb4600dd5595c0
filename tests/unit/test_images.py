"""ImageSpec.parse, parse_size and Layout.parse: bad input fails with a
message naming the argument, before anything reaches librbd."""
from typing import Any, Dict, Optional

import pytest
import rbd

from rbd_migration.errors import InvalidArgument
from rbd_migration.images import (DEFAULT_POOL, FEATURES, MAX_ORDER, MIN_ORDER,
                                  ImageSpec, Layout, parse_size)

KiB, MiB = 1 << 10, 1 << 20


def refused(message: str, **kwargs: Any) -> None:
    """Layout.parse(**kwargs) fails with exactly ``message``."""
    with pytest.raises(InvalidArgument) as info:
        Layout.parse(**kwargs)
    assert str(info.value) == message
    assert info.value.errno == 22 and not info.value.transient


# -- ImageSpec ------------------------------------------------------------------

@pytest.mark.parametrize('text, pool, namespace, name', [
    ('img', DEFAULT_POOL, '', 'img'),
    ('pool/img', 'pool', '', 'img'),
    ('pool/ns/img', 'pool', 'ns', 'img'),
    ('  pool/ns/img\n', 'pool', 'ns', 'img'),
    ('my-pool.1/ns_2/image.raw', 'my-pool.1', 'ns_2', 'image.raw'),
])
def test_image_spec_parses(text: str, pool: str, namespace: str, name: str) -> None:
    spec = ImageSpec.parse(text)
    assert (spec.pool, spec.namespace, spec.name) == (pool, namespace, name)


def test_image_spec_str_round_trips() -> None:
    assert DEFAULT_POOL == 'rbd'
    assert str(ImageSpec.parse('img')) == 'rbd/img'
    assert str(ImageSpec.parse('p/img')) == 'p/img'
    assert str(ImageSpec.parse('p/ns/img')) == 'p/ns/img'
    assert ImageSpec.parse(str(ImageSpec('p', 'ns', 'i'))) == ImageSpec('p', 'ns', 'i')


@pytest.mark.parametrize('text', [
    '', '   ', '/img', 'pool/', 'pool/ns/', '/ns/img', 'a/b/c/d', 'img@snap',
    'pool/img@snap', 'pool/my img', 'po ol/img', 'pool/ns x/img', '//',
])
def test_image_spec_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ImageSpec.parse(text)
    assert str(info.value) == f"image_spec: '{text}' is not [pool/[namespace/]]image"


def test_image_spec_error_names_the_argument() -> None:
    with pytest.raises(InvalidArgument,
                       match=r"^dest_image_spec: 'a/b/c/d' is not \[pool/\[namespace/\]\]image$"):
        ImageSpec.parse('a/b/c/d', 'dest_image_spec')


def test_image_spec_none_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="^source_image_spec: 'None' is not"):
        ImageSpec.parse(None, 'source_image_spec')  # type: ignore[arg-type]


# -- parse_size ---------------------------------------------------------------

@pytest.mark.parametrize('text, size', [
    ('4096', 4096), ('4K', 4 * KiB), ('4k', 4 * KiB), ('4KiB', 4 * KiB),
    ('4KB', 4 * KiB), ('8M', 8 * MiB), ('8MiB', 8 * MiB), (' 8 M ', 8 * MiB),
    ('1G', 1 << 30), ('2T', 2 << 40), ('512B', 512), ('0', 0),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, '--x') == size


@pytest.mark.parametrize('text', ['', 'M', '1.5M', '-4K', '4P', '4 MB B', 'four'])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_size(text, '--stripe-unit')
    assert str(info.value) == f"--stripe-unit: '{text}' is not a size (e.g. 4M, 65536)"


# -- Layout: object size and order ----------------------------------------------

def test_empty_layout_leaves_everything_to_librbd() -> None:
    layout = Layout.parse()
    assert layout == Layout()
    assert layout.librbd_kwargs() == {}
    assert layout.describe() == {}


@pytest.mark.parametrize('size, order', [
    ('4K', 12), ('4096', 12), ('8K', 13), ('64K', 16), ('1M', 20), ('4M', 22),
    ('4MiB', 22), ('16M', 24), ('32M', 25)])
def test_object_size_sets_the_order(size: str, order: int) -> None:
    layout = Layout.parse(object_size=size)
    assert layout.order == order
    assert layout.librbd_kwargs() == {'order': order}
    assert layout.describe() == {'object_size': 1 << order}


@pytest.mark.parametrize('size', ['3M', '0', '12K', '5000'])
def test_object_size_must_be_a_power_of_two(size: str) -> None:
    refused(f'--object-size: {size} is not a power of two', object_size=size)


@pytest.mark.parametrize('size', ['64M', '2K', '512', '1G'])
def test_object_size_must_be_within_bounds(size: str) -> None:
    refused(f'--object-size: {size} is outside 4K..32M', object_size=size)


def test_object_size_must_be_a_size() -> None:
    refused("--object-size: '4X' is not a size (e.g. 4M, 65536)", object_size='4X')


@pytest.mark.parametrize('order', [MIN_ORDER, 16, 22, MAX_ORDER])
def test_order_within_bounds(order: int) -> None:
    assert (MIN_ORDER, MAX_ORDER) == (12, 25)
    layout = Layout.parse(order=order)
    assert layout.order == order
    assert layout.describe() == {'object_size': 1 << order}


@pytest.mark.parametrize('order', [MIN_ORDER - 1, MAX_ORDER + 1, 0, -1, 64])
def test_order_out_of_bounds(order: int) -> None:
    refused(f'--order: {order} is outside 12..25 (4 KiB..32 MiB objects)', order=order)


def test_object_size_and_order_are_exclusive() -> None:
    refused('--object-size and --order: give one of them', object_size='4M', order=22)


# -- Layout: features ----------------------------------------------------------------

def test_features_by_name() -> None:
    layout = Layout.parse(features='layering, exclusive-lock,object-map,fast-diff,')
    assert layout.feature_names == ['layering', 'exclusive-lock', 'object-map', 'fast-diff']
    assert layout.features == (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                               | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
    assert layout.librbd_kwargs() == {'features': layout.features}
    assert layout.describe() == {'features': layout.feature_names}


def test_every_known_feature_maps_to_its_bit() -> None:
    assert FEATURES['striping'] == rbd.RBD_FEATURE_STRIPINGV2
    assert FEATURES['deep-flatten'] == rbd.RBD_FEATURE_DEEP_FLATTEN
    assert FEATURES['journaling'] == rbd.RBD_FEATURE_JOURNALING
    layout = Layout.parse(features=','.join(FEATURES))
    expected = 0
    for bit in FEATURES.values():
        assert bit and bit & (bit - 1) == 0
        expected |= bit
    assert layout.features == expected


def test_layering_alone() -> None:
    layout = Layout.parse(features='layering')
    assert layout.features == rbd.RBD_FEATURE_LAYERING


@pytest.mark.parametrize('features, unknown', [
    ('layering,bogus', 'bogus'), ('Layering', 'Layering'),
    ('layering,stripingv2,also-bad', 'stripingv2')])
def test_unknown_feature(features: str, unknown: str) -> None:
    refused(f"--features: unknown feature '{unknown}' (known: layering, striping, "
            'exclusive-lock, object-map, fast-diff, deep-flatten, journaling)',
            features=features)


@pytest.mark.parametrize('features', ['exclusive-lock', 'exclusive-lock,object-map', '', ' , '])
def test_features_need_layering(features: str) -> None:
    refused('--features: a migration target needs layering; add it '
            '(e.g. --features layering,exclusive-lock)', features=features)


# -- Layout: striping -------------------------------------------------------------------

def test_stripe_unit_and_count() -> None:
    layout = Layout.parse(stripe_unit='64K', stripe_count=8)
    assert (layout.stripe_unit, layout.stripe_count) == (64 * KiB, 8)
    assert layout.librbd_kwargs() == {'stripe_unit': 64 * KiB, 'stripe_count': 8}
    assert layout.describe() == {'stripe_unit': 64 * KiB, 'stripe_count': 8}


def test_stripe_unit_equal_to_the_object_size() -> None:
    layout = Layout.parse(object_size='1M', stripe_unit='1M', stripe_count=1)
    assert (layout.order, layout.stripe_unit) == (20, MiB)


@pytest.mark.parametrize('kwargs', [{'stripe_unit': '64K'}, {'stripe_count': 4}])
def test_stripe_unit_and_count_go_together(kwargs: Dict[str, Any]) -> None:
    refused('--stripe-unit and --stripe-count go together; give both', **kwargs)


@pytest.mark.parametrize('unit', ['256', '511', '0', '3K', '96K'])
def test_stripe_unit_power_of_two_at_least_512(unit: str) -> None:
    refused(f'--stripe-unit: {unit} must be a power of two of at least 512',
            stripe_unit=unit, stripe_count=2)


def test_stripe_unit_512_is_the_minimum() -> None:
    assert Layout.parse(stripe_unit='512', stripe_count=2).stripe_unit == 512


@pytest.mark.parametrize('kwargs', [{'object_size': '1M'}, {'order': 20}])
def test_stripe_unit_not_larger_than_the_object(kwargs: Dict[str, Any]) -> None:
    refused('--stripe-unit: 2M is larger than the object size',
            stripe_unit='2M', stripe_count=2, **kwargs)


def test_stripe_unit_must_be_a_size() -> None:
    refused("--stripe-unit: 'lots' is not a size (e.g. 4M, 65536)",
            stripe_unit='lots', stripe_count=2)


@pytest.mark.parametrize('count', [0, -3])
def test_stripe_count_at_least_one(count: int) -> None:
    refused(f'--stripe-count: {count} must be at least 1', stripe_unit='64K',
            stripe_count=count)


# -- Layout: data pool, flatten, the whole thing ------------------------------------

@pytest.mark.parametrize('data_pool, expected', [(None, None), ('', None), ('ec', 'ec')])
def test_data_pool(data_pool: Optional[str], expected: Optional[str]) -> None:
    layout = Layout.parse(data_pool=data_pool)
    assert layout.data_pool == expected
    assert layout.librbd_kwargs() == ({'data_pool': expected} if expected else {})


def test_flatten_is_described_but_not_passed_to_librbd() -> None:
    layout = Layout.parse(flatten=True)
    assert layout.flatten is True
    assert layout.librbd_kwargs() == {}
    assert layout.describe() == {'flatten': True}
    assert Layout.parse(flatten=False).describe() == {}


def test_full_layout_kwargs_and_description() -> None:
    layout = Layout.parse(object_size='8M', features='layering,striping',
                          stripe_unit='1M', stripe_count=4, data_pool='ecdata',
                          flatten=True)
    features = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_STRIPINGV2
    assert layout.librbd_kwargs() == {
        'features': features, 'order': 23, 'stripe_unit': MiB,
        'stripe_count': 4, 'data_pool': 'ecdata'}
    assert layout.describe() == {
        'object_size': 8 * MiB, 'features': ['layering', 'striping'],
        'stripe_unit': MiB, 'stripe_count': 4, 'data_pool': 'ecdata',
        'flatten': True}


def test_librbd_kwargs_match_migration_prepare() -> None:
    """Every keyword we pass is one the bindings' migration_prepare takes."""
    doc = rbd.RBD.migration_prepare.__doc__ or ''
    signature = doc.splitlines()[0]
    layout = Layout.parse(order=22, features='layering', stripe_unit='64K',
                          stripe_count=2, data_pool='d')
    for key in layout.librbd_kwargs():
        assert f'{key}=' in signature, key


def test_stripe_unit_checked_against_the_inherited_object_size() -> None:
    """With no --object-size the target inherits one; a stripe unit above
    it is refused naming both (librbd answers a bare EINVAL)."""
    layout = Layout.parse(stripe_unit='8M', stripe_count=2)
    with pytest.raises(InvalidArgument) as info:
        layout.check_stripe(22, "the source's")
    assert str(info.value) == (
        "--stripe-unit: 8388608 is larger than the object size (4194304, the "
        "source's); give a smaller --stripe-unit or a larger --object-size")
    layout.check_stripe(23, "the source's")
    Layout.parse(object_size='8M', stripe_unit='8M', stripe_count=2).check_stripe(22, 'x')
    Layout.parse().check_stripe(12, 'x')
