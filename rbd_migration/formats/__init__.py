"""Format registry: the source-spec's ``type`` names an implementation.

Adding a format is one module here plus one line below.
"""
import importlib
from typing import Any, Dict, Mapping, Type

from ..context import SourceContext
from ..errors import InvalidArgument
from .base import Format

REGISTRY: Dict[str, str] = {
    'raw': 'raw:RawFormat',
    'qcow': 'qcow:QcowFormat',
    'native': 'native:NativeFormat',
    'export': 'export_v2:ExportV2Format',
    'export-diff': 'export_diff:ExportDiffFormat',
    'vmdk': 'vmdk:VmdkFormat',
    'ova': 'ova:OvaFormat',
}


def format_class(type_name: str) -> Type[Format]:
    try:
        module, cls = REGISTRY[type_name].split(':')
    except KeyError:
        raise InvalidArgument(
            f"source-spec: type: '{type_name}' is not one of "
            f"{', '.join(sorted(REGISTRY))}") from None
    return getattr(importlib.import_module(f'{__name__}.{module}'), cls)


def open_format(spec: Mapping[str, Any], ctx: SourceContext) -> Format:
    return format_class(spec['type']).from_spec(spec, ctx)
