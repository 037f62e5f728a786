"""``triage publications [list | retry [EVENT_ID ...] | revert EVENT_ID ...]``: the worklist priority
publications (:mod:`worker.publishing`)."""
from __future__ import annotations

from pacs_bridge.publishers import FAILED, REVERTED
from sql.database import make_engine
from worker.config import load_settings
from worker.publishing import dead_publications, publications, retry_failed, revert


def register(subparsers) -> None:
    """``triage publications [list]``, ``... retry [EVENT_ID ...]`` and ``... revert EVENT_ID ...``."""
    parser = subparsers.add_parser("publications", help="list worklist priority publications; revert raises")
    sub = parser.add_subparsers(dest="publications_command")
    parser.set_defaults(func=_list, study=None, limit=50)
    listing = sub.add_parser("list", help="recent publications, newest first")
    listing.add_argument("--study", help="only this Study Instance UID")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=_list)
    again = sub.add_parser("retry", help="publish again where a publisher's latest attempt failed")
    again.add_argument("ids", nargs="*", type=int, help="event ids of failed publications (default: all)")
    again.set_defaults(func=_retry)
    undo = sub.add_parser("revert", help="put back the priority a publication replaced (if still ours)")
    undo.add_argument("ids", nargs="+", type=int, help="event ids of 'raised' publications")
    undo.set_defaults(func=_revert)


def _open(args):
    settings = load_settings(args.config)
    return settings, make_engine(settings.database_url)


def _list(args) -> int:
    _, engine = _open(args)
    dead = [r for r in dead_publications(engine) if not args.study or r.study_instance_uid == args.study]
    if dead:
        print(f"{'event':>6}  {'at':<19}  {'publisher':<12} {'state':<9} {'run':>5}  study")
        for r in dead:
            d = r.detail or {}
            print(f"{r.id:>6}  {r.at:%Y-%m-%d %H:%M:%S}  {d.get('publisher', ''):<12} {'dead':<9} "
                  f"{d.get('run_id', '-'):>5}  {r.study_instance_uid}")
        print()
    rows = publications(engine, args.study, args.limit)
    if not rows:
        print("no publications recorded")
        return 0
    print(f"{'event':>6}  {'at':<19}  {'publisher':<12} {'action':<9} {'original -> new':<18} target / study")
    for r in rows:
        d = r.detail or {}
        change = f"{d.get('original') or '?'} -> {d.get('new') or '-'}"
        print(f"{r.id:>6}  {r.at:%Y-%m-%d %H:%M:%S}  {d.get('publisher', ''):<12} {d.get('action', ''):<9} "
              f"{change:<18} {d.get('target', '')} / {r.study_instance_uid}")
    return 0


def _retry(args) -> int:
    settings, engine = _open(args)
    done = retry_failed(settings, engine, args.ids or None)
    if not done:
        print("no failed publication to retry")
        return 0
    for p in done:
        print(f"{p.publisher} {p.target}: {p.action}: {p.reason}")
    return 0 if all(p.action != FAILED for p in done) else 1


def _revert(args) -> int:
    settings, engine = _open(args)
    status = 0
    for event_id in args.ids:
        try:
            p = revert(settings, engine, event_id)
        except ValueError as exc:
            print(f"publication {event_id}: {exc}")
            status = 1
            continue
        print(f"publication {event_id}: {p.action}: {p.reason}")
        status |= 0 if p.action == REVERTED else 1
    return status
