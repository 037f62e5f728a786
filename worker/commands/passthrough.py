"""Subcommands that hand all their arguments to a parser of their own (``triage phantoms``, ``triage bench NAME``,
``triage fairness make-cohort``); :func:`worker.cli.parse_arguments` reads the marks set here.
"""
from __future__ import annotations

import argparse


def add_passthrough(subparsers, name: str, func, help: str, global_options: bool = False
                    ) -> argparse.ArgumentParser:
    """A subcommand whose arguments, all of them, go to a parser of its own (built when it runs, because building
    it imports numpy or torch): ``func`` gets them as ``args.rest`` and parses them, ``--help`` included.

    argparse cannot hand options that come before the first positional to a ``REMAINDER`` argument (it treats
    them as unknown options: "unrecognized arguments: --help"); ``parse_arguments`` puts them back in front, in
    order. ``global_options``: ``--config``, ``-v`` and ``--log-format`` anywhere in them are triage's (leave it
    off where the command's own parser has options of those names, as ``bench embedder --config`` does)."""
    parser = subparsers.add_parser(name, help=help, add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=func, passthrough="global_options" if global_options else "all")
    return parser
