"""The database package: the table declarations (:mod:`sql.schema` and the ``*_schema`` modules it imports),
engines and migrations (:mod:`sql.database`), the reporting views, and the small data-access functions more than
one layer needs (:mod:`sql.model_registry`, :mod:`sql.embedding_store`, ...). It imports none of the project's
other packages.

The Alembic migrations and the views' SQL are read at run time from where this package is installed (a checkout
or site-packages), never from the current directory: ``triage db upgrade`` runs :data:`MIGRATIONS_DIR`
(``env.py`` and ``versions/``); the migrations create the views under :data:`VIEWS_DIR` (see
:mod:`sql.reporting_views`). Both folders ship in the wheel as package data.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
VIEWS_DIR = PACKAGE_DIR / "views"
