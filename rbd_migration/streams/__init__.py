"""Stream registry: the source-spec's ``stream.type`` names an implementation.

Adding a stream is one module here plus one line below.  Implementations are
imported lazily so that boto3 is loaded only by those who read from S3.
"""
import importlib
from typing import Any, Dict, Mapping, Type

from ..context import SourceContext
from ..errors import InvalidArgument
from .base import Stream

REGISTRY: Dict[str, str] = {
    'file': 'file:FileStream',
    'http': 'http:HttpStream',
    'nbd': 'nbd:NbdStream',
    's3': 's3:S3Stream',
}


def stream_class(type_name: str) -> Type[Stream]:
    try:
        module, cls = REGISTRY[type_name].split(':')
    except KeyError:
        raise InvalidArgument(
            f"source-spec: stream.type: '{type_name}' is not one of "
            f"{', '.join(sorted(REGISTRY))}") from None
    return getattr(importlib.import_module(f'{__name__}.{module}'), cls)


def open_stream(spec: Mapping[str, Any], ctx: SourceContext) -> Stream:
    return stream_class(spec['type']).from_spec(spec, ctx)
