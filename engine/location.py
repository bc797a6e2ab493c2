"""Where a repository lives: parse the REPO string a user gives.

A repository is a local directory or an S3 bucket prefix (``s3://BUCKET/PREFIX``).
Strings that look like URIs of remote stores that are planned (``sftp:``, ``rest:``)
or malformed S3 locations (``s3:https://host/bucket``) are refused with one line,
instead of being taken for a relative path (``init s3:https://host/bucket`` once
created a local folder named ``s3:https:``). ``RepoLocation.target`` is what
``Repository.init``/``open`` take; they pick the matching ``Backend``.

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
    "sftp": "SFTP",
    "rest": "a REST server",
}
"""Remote repositories that are coming; a location naming one is refused for now."""

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


S3_FORM = "s3://BUCKET/PREFIX (the service from --s3-endpoint or $SNAPFERRY_S3_ENDPOINT)"


@dataclass(frozen=True, slots=True)
class RepoLocation:
    """A parsed repository location: a local directory, or an S3 URL."""

    kind: Literal["local", "s3"]
    path: Path
    url: str = ""

    @property
    def target(self) -> str | Path:
        """What ``Repository.init`` / ``Repository.open`` take."""
        return self.url if self.kind == "s3" else self.path

    def __str__(self) -> str:
        return self.url if self.kind == "s3" else str(self.path)


def _s3_location(text: str) -> RepoLocation:
    parts = urlsplit(text)
    if not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"S3 repository {text!r} is not of the form {S3_FORM}")
    bucket = parts.netloc
    if not 3 <= len(bucket) <= 63 or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", bucket):
        raise UsageError(
            f"S3 repository {text!r}: {bucket!r} is not a valid bucket name "
            "(3-63 characters: lower-case letters, digits, '.' and '-')"
        )
    return RepoLocation("s3", Path(), url=text)


def _planned_message(scheme: str, text: str) -> str:
    if scheme == "s3":
        return f"S3 repositories are written {S3_FORM}, not {text!r}"
    known = ", ".join(f"{s}:" for s in PLANNED_SCHEMES)
    what = PLANNED_SCHEMES.get(scheme)
    head = f"{what} repositories ({scheme}:)" if what else f"{scheme}: repositories"
    return (
        f"{head} are not supported yet ({known} are planned): {text!r} is not a local "
        "directory; give a path such as /backup/repo"
    )


def parse_location(text: str) -> RepoLocation:
    """``/backup/repo``, ``./repo`` or ``file:///backup/repo`` → a local location;
    ``s3://BUCKET/PREFIX`` → an S3 location; other ``s3:...`` forms, ``sftp:...``,
    ``rest:...`` and any other ``scheme://`` → ``UsageError``."""
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
        if scheme == "s3" and text[m.end() :].startswith("//"):
            return _s3_location(text)
        if scheme in PLANNED_SCHEMES or scheme == "s3":
            raise UsageError(_planned_message(scheme, text))
        if text[m.end() :].startswith("//"):
            raise UsageError(_planned_message(scheme, text))
    return RepoLocation("local", Path(text))


def check_new_location(loc: RepoLocation) -> None:
    """Refuse a new repository whose parent directory is missing (only the last path
    component is created), before anything is written. S3: nothing to check here
    (the backend creates a missing bucket and refuses a non-empty prefix)."""
    if loc.kind == "s3":
        return
    path = loc.path
    parent = path.absolute().parent
    if not parent.exists():
        raise UsageError(
            f"cannot create repository {path}: its parent directory {parent} does not "
            "exist (init creates only the last path component; create the parent first)"
        )
    if not parent.is_dir():
        raise UsageError(f"cannot create repository {path}: {parent} is not a directory")
