"""The ``triage`` command groups, one module each: ``register(subparsers)`` adds the group's subcommands."""
