"""The ``triage`` command line's groups, one module per group, and the Celery tasks that run train's jobs.

This package and :mod:`worker.cli` are the one composition root of the project: the only modules that import
both ``worker`` and ``train`` (DESIGN.md, "Imports run one way"; the import-linter contract in pyproject.toml).
They read the configuration and pass train what it needs as arguments (:mod:`worker.commands.train_settings`);
train never reads the configuration itself.
"""
