"""Name a restore point the way people do: an id, a unique id prefix, or ``latest``.

* ``20261125T193924Z-3f9a``: that restore point;
* ``20261125T19``: the one restore point whose id starts so (ambiguous → an error that
  lists the candidates);
* ``latest``: the newest restore point, when the repository holds one series only;
* ``latest:NAME``: the newest restore point of the series ``NAME``.
"""

from __future__ import annotations

from snapferry.engine.errors import RepositoryError, UsageError
from snapferry.engine.store.manifest import Manifest
from snapferry.engine.store.repo import Repository

LATEST = "latest"
_SHOW = 5  # candidates named in an ambiguity error


def _names(backups: list[Manifest]) -> list[str]:
    return sorted({m.vm for m in backups})


def resolve_restore_point(repo: Repository, ref: str) -> str:
    """The full backup id that ``ref`` names in ``repo`` (``RepositoryError`` when none
    does, ``UsageError`` when it names more than one)."""
    ref = ref.strip()
    if not ref:
        raise UsageError("empty restore point id")
    if ref != LATEST and not ref.startswith(LATEST + ":"):
        try:
            repo.backup_dir(ref)  # an exact id: no need to read every manifest
            return ref
        except RepositoryError:
            pass
    backups = repo.list_backups()
    if ref == LATEST or ref.startswith(LATEST + ":"):
        name = ref[len(LATEST) + 1 :] if ":" in ref else None
        if name is not None:
            of = [m for m in backups if m.vm == name]
            if not of:
                known = ", ".join(_names(backups)) or "none"
                raise RepositoryError(
                    f"no restore point of {name!r} in {repo.path} (series: {known})"
                )
            return of[-1].backup_id
        if not backups:
            raise RepositoryError(f"no restore points in {repo.path}")
        names = _names(backups)
        if len(names) > 1:
            raise UsageError(
                f"'latest' is ambiguous: the repository holds {len(names)} series "
                f"({', '.join(names[:_SHOW])}{', ...' if len(names) > _SHOW else ''}); "
                "use latest:NAME"
            )
        return backups[-1].backup_id
    ids = [m.backup_id for m in backups]
    if ref in ids:
        return ref
    hits = [i for i in ids if i.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise RepositoryError(f"no restore point {ref!r} in {repo.path}")
    shown = ", ".join(hits[:_SHOW]) + (", ..." if len(hits) > _SHOW else "")
    raise UsageError(
        f"restore point id prefix {ref!r} is ambiguous: {len(hits)} match ({shown})"
    )
