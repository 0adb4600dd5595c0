"""What a migration is, as every layer of the module sees it: the two
images by pool, namespace, name and id, and the state librbd (or our
adapter engine) reports for it."""
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional

from ..images import ImageSpec

#: Called with (done, total); a non-zero return cancels the librbd operation.
ProgressFn = Callable[[int, int], int]


@dataclass(frozen=True)
class ImageRef:
    pool_id: int
    pool: str
    namespace: str
    name: str
    id: str

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.pool, self.namespace, self.name)

    @property
    def key(self) -> str:
        """What tasks and batches know the image by: ids survive renames."""
        return f'{self.pool_id}/{self.namespace}/{self.id}'

    def __str__(self) -> str:
        return str(self.spec)


@dataclass
class MigrationInfo:
    dest: ImageRef
    state: str
    state_description: str
    source: Optional[ImageRef] = None
    #: For import-only migrations: the source-spec with secrets masked.
    source_spec: Optional[Dict[str, Any]] = None
    #: librbd cannot open the source, so it cannot open the target either;
    #: only abort (or restoring the source) gets out of this.
    source_unavailable: bool = False
    #: Which engine serves it: librbd's live migration, or our adapters.
    path: str = 'librbd'
    #: 'commit' or 'abort' when librbd stopped half-way through finishing
    #: it; only running that action again gets out of it.
    interrupted: Optional[str] = None

    @property
    def import_only(self) -> bool:
        return self.source is None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['import_only'] = self.import_only
        return d
