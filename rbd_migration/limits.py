"""What any one source may cost the mgr, whatever its bytes say.

Every number a source's metadata carries (table sizes, snapshot and record
counts, name lengths) is chosen by whoever wrote the file.  Parsers check
them against these bounds before they allocate or loop, and refuse past
them with one line naming the bound and the option that raises it.  The
defaults fit every image QEMU and rbd write in practice; each is a module
option (``source_max_*``) so an operator can raise it for an odd source.
"""
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class SourceLimits:
    #: Bytes of metadata a format may hold in memory at once for one open
    #: source: qcow2 L1 tables and cached L2 tables, snapshot tables,
    #: export-diff indexes (28 bytes a record).  Also bounds any one
    #: metadata read.  16 MiB keeps a probe of any input within 16 MiB.
    metadata_bytes: int = 16 * MiB
    #: Snapshots one source may have (a qcow2 snapshot table, a spec's
    #: ``snapshots`` list, an export-diff chain).
    snapshots: int = 512
    #: Records one export-diff or export stream may hold.
    records: int = 500_000
    #: Layers of a qcow2 backing chain.
    chain_depth: int = 16

    @staticmethod
    def option_name(field_name: str) -> str:
        """The module option that sets ``field_name``."""
        return f'source_max_{field_name}'

    def refuse(self, field_name: str, what: str, value: int) -> str:
        """The one-line refusal when ``what`` needs ``value`` past a bound."""
        bound = getattr(self, field_name)
        return (f'{what} needs {value}, past the limit of {bound} '
                f'(ceph config set mgr mgr/rbd_migration/'
                f'{self.option_name(field_name)} to raise it)')
