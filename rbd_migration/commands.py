"""Commands declared once: a typed handler is its own descriptor.

The mgr's ``CLICommand`` decorators derive a command's arguments from its
handler's annotations, but their dispatch reads any value of the form
``<arg>=<value>`` as a keyword once one argument does: ``batch prepare
--pattern 'auto_commit=*'`` would become ``auto_commit='*'`` and lose its
pattern.  So this table takes the descriptors the same way (ceph_argparse's
own ``to_argdesc``, which Pacific has) and passes every value by its name
only.  It imports nothing of the mgr, so the commands are testable without
one; ``module.py`` registers the table's descriptors as ``COMMANDS``.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, get_type_hints

from ceph_argparse import CephArgtype

Handler = Callable[..., Dict[str, Any]]
Renderer = Callable[[Dict[str, Any]], str]

#: Parameters a handler may take that are no command arguments.
_NOT_ARGS = ('self', 'inbuf')


@dataclass
class Param:
    name: str
    type: Any
    default: Any
    required: bool


@dataclass
class Command:
    prefix: str
    perm: str
    desc: str
    func: Handler
    render: Renderer
    params: List[Param]
    #: The argument naming the image the command changes (two changes of
    #: one image never run at once), or 'batches'; None for reads.
    changes: Optional[str] = None
    takes_inbuf: bool = False

    @property
    def verb(self) -> str:
        return self.prefix.replace('rbd migration ', '', 1)

    def descriptor(self) -> Dict[str, str]:
        """The command as ``MgrModule.COMMANDS`` lists it."""
        args = [CephArgtype.to_argdesc(_bare(p.type), dict(name=p.name), not p.required)
                for p in self.params]
        return {'cmd': ' '.join([self.prefix, *args]), 'desc': self.desc, 'perm': self.perm}

    def arguments(self, cmd: Dict[str, Any], inbuf: Optional[str]) -> Dict[str, Any]:
        """The handler's keyword arguments: each value by its own name, cast
        to its annotation; an absent optional one keeps its default."""
        kwargs: Dict[str, Any] = {}
        for p in self.params:
            value = cmd.get(p.name)
            if value is not None:
                kwargs[p.name] = CephArgtype.cast_to(_bare(p.type), value)
        if self.takes_inbuf:
            kwargs['inbuf'] = inbuf or None
        return kwargs


@dataclass
class CommandTable:
    commands: Dict[str, Command] = field(default_factory=dict)

    def __call__(self, prefix: str, perm: str, render: Renderer,
                 changes: Optional[str] = None) -> Callable[[Handler], Handler]:
        """Declare the decorated method as the handler of ``prefix``; its
        docstring is the command's help, its annotated parameters its
        arguments (those with a default optional)."""
        def declare(func: Handler) -> Handler:
            hints = get_type_hints(func)
            signature = inspect.signature(func)
            params = [Param(name, hints[name], p.default, p.default is inspect.Parameter.empty)
                      for name, p in signature.parameters.items() if name not in _NOT_ARGS]
            desc = ' '.join((inspect.getdoc(func) or '').split())
            self.commands[prefix] = Command(prefix, perm, desc, func, render, params,
                                            changes, 'inbuf' in signature.parameters)
            return func
        return declare

    def descriptors(self) -> List[Dict[str, str]]:
        return [c.descriptor() for c in self.commands.values()]

    def __getitem__(self, prefix: str) -> Command:
        return self.commands[prefix]


def _bare(tp: Any) -> Any:
    """``Optional[X]`` as ``X``: what a given value is cast to."""
    args: Tuple[Any, ...] = getattr(tp, '__args__', ())
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp
