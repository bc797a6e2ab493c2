"""Where a repository lives: parse the REPO string a user gives.

Today every repository is a local directory. Strings that look like URIs of remote
stores that are planned (``s3:``, ``sftp:``, ``rest:``) are refused with one line
that names them, instead of being taken for a relative path (``init
s3:https://host/bucket`` once created a local folder named ``s3:https:``). This is
where an object-store backend will plug in: ``parse_location`` will return a location
of another ``kind``, and the repository will open the matching ``Backend``.

``init`` creates only the last path component: a typo in a parent folder
(``/backup/rpeo/vm1``) is an error, not a new tree of folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from snapferry.engine.errors import UsageError

PLANNED_SCHEMES = {
    "s3": "S3 object storage",
    "sftp": "SFTP",
    "rest": "a REST server",
}
"""Remote repositories that are coming; a location naming one is refused for now."""

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True, slots=True)
class RepoLocation:
    """A parsed repository location (only ``local`` exists so far)."""

    kind: Literal["local"]
    path: Path

    def __str__(self) -> str:
        return str(self.path)


def _planned_message(scheme: str, text: str) -> str:
    known = ", ".join(f"{s}:" for s in PLANNED_SCHEMES)
    what = PLANNED_SCHEMES.get(scheme)
    head = f"{what} repositories ({scheme}:)" if what else f"{scheme}: repositories"
    return (
        f"{head} are not supported yet ({known} are planned): {text!r} is not a local "
        "directory; give a path such as /backup/repo"
    )


def parse_location(text: str) -> RepoLocation:
    """``/backup/repo``, ``./repo`` or ``file:///backup/repo`` → a local location;
    ``s3:...``, ``sftp:...``, ``rest:...`` and any other ``scheme://`` → ``UsageError``."""
    if not text or not text.strip():
        raise UsageError("empty repository location")
    m = _SCHEME_RE.match(text)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file" and text[m.end() :].startswith("//"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise UsageError(f"file: location {text!r} names another host")
            return RepoLocation("local", Path(unquote(parts.path)))
        if scheme in PLANNED_SCHEMES:
            raise UsageError(_planned_message(scheme, text))
        if text[m.end() :].startswith("//"):
            raise UsageError(_planned_message(scheme, text))
    return RepoLocation("local", Path(text))


def check_new_location(loc: RepoLocation) -> None:
    """Refuse a new repository whose parent directory is missing (only the last path
    component is created), before anything is written."""
    path = loc.path
    parent = path.absolute().parent
    if not parent.exists():
        raise UsageError(
            f"cannot create repository {path}: its parent directory {parent} does not "
            "exist (init creates only the last path component; create the parent first)"
        )
    if not parent.is_dir():
        raise UsageError(f"cannot create repository {path}: {parent} is not a directory")
