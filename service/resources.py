"""Where the files that ship with pointgate live: migrations and the example thing models.

In a wheel they are packaged under ``service/_data/``; in a source checkout (or an editable install) they are
the repository's top-level ``migrations/`` and ``schemas/`` folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    packaged = _PACKAGE / "_data" / name
    return packaged if packaged.is_dir() else _PACKAGE.parent / name


def migrations_dir() -> Path:
    """The directory of numbered SQL migrations."""
    return _locate("migrations")


def schemas_dir() -> Path:
    """The directory of shipped thing models (the default for ``--models``)."""
    return _locate("schemas")
