"""``triage deliveries [list]`` and ``triage deliveries retry [ID ...]``: undelivered results and their retry
(:mod:`worker.delivery`)."""
from __future__ import annotations

from sql.database import make_engine
from worker.config import load_settings
from worker.delivery import DeliveryBook


def register(subparsers) -> None:
    """``triage deliveries [list]`` and ``triage deliveries retry [ID ...]``."""
    parser = subparsers.add_parser("deliveries", help="list undelivered results; retry dead-lettered ones")
    sub = parser.add_subparsers(dest="deliveries_command")
    parser.set_defaults(func=_list)
    sub.add_parser("list", help="undelivered and dead-lettered deliveries").set_defaults(func=_list)
    retry = sub.add_parser("retry", help="deliver dead-lettered results again, now")
    retry.add_argument("ids", nargs="*", type=int, help="delivery ids (default: all dead-lettered)")
    retry.set_defaults(func=_retry)


def _book(args) -> DeliveryBook:
    settings = load_settings(args.config)
    return DeliveryBook(settings, make_engine(settings.database_url))


def _list(args) -> int:
    rows = _book(args).undelivered()
    if not rows:
        print("all results delivered")
        return 0
    print(f"{'id':>5}  {'run':>5}  {'what':<13} {'destination':<16} {'status':<9} {'tries':>5}  last error")
    for r in rows:
        state = "dead" if r.status == "failed" else r.status
        what = "SR" if r.kind == "sr" else f"{len(r.files or [])} images"
        run = "-" if r.run_id is None else r.run_id
        print(f"{r.id:>5}  {run:>5}  {what:<13} {r.destination:<16} {state:<9} {r.attempts:>5}  "
              f"{r.last_error or ''}")
    return 0


def _retry(args) -> int:
    outcomes = _book(args).retry_dead(args.ids or None)
    if not outcomes:
        print("nothing dead-lettered to retry")
        return 0
    for delivery_id, outcome in outcomes.items():
        print(f"delivery {delivery_id}: " + ("delivered" if outcome.delivered else f"failed again: {outcome.error}"))
    return 0 if all(o.delivered for o in outcomes.values()) else 1
