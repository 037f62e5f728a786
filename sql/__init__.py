"""The database package's files: Alembic migrations and reporting views, read at run time from where this package
is installed (a checkout or site-packages), never from the current directory.

``triage db upgrade`` runs :data:`MIGRATIONS_DIR` (``env.py`` and ``versions/``); the migrations create the views
under :data:`VIEWS_DIR` (see :mod:`pacs_bridge.reporting_views`). Both folders ship in the wheel as package data.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
VIEWS_DIR = PACKAGE_DIR / "views"
