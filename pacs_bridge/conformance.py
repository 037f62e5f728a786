"""The generated parts of ``docs/conformance.md``: the SOP class and transfer syntax tables, made from the code.

The Conformance Statement's tables of what the Storage SCP accepts must never drift from what it negotiates, so
they are not written by hand: they are rendered from :data:`pacs_bridge.scp.STORAGE_SOP_CLASSES` and
:data:`pacs_bridge.scp.TRANSFER_SYNTAXES` between marker comments in the document, and a test negotiates every
row (and refuses what is not in them) against the running SCP::

    python -m pacs_bridge.conformance --write docs/conformance.md   # regenerate the tables in place
    python -m pacs_bridge.conformance --check docs/conformance.md   # exit 1 when the document is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

from pacs_bridge.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

#: Marker pairs in the document: ``<!-- generated: NAME -->`` ... ``<!-- end generated: NAME -->``.
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                    re.DOTALL)
#: Verification is negotiated beside the storage classes (C-ECHO).
VERIFICATION = ("Verification", "1.2.840.10008.1.1")


def sop_class_table() -> str:
    """SCP SOP classes: name, UID, and what happens to objects of the class."""
    rows = ["| SOP Class | UID | Role | What happens to it |", "|---|---|---|---|",
            f"| {VERIFICATION[0]} | `{VERIFICATION[1]}` | SCP | C-ECHO answered |"]
    for name, uid in STORAGE_SOP_CLASSES.items():
        title = UID(uid).name if UID(uid).is_valid and UID(uid).name != uid else name
        derived = uid.startswith("1.2.840.10008.5.1.4.1.1.88.") or uid.startswith("1.2.840.10008.5.1.4.1.1.11.")
        fate = ("stored and recorded; never processed (derived object: loop prevention)" if derived
                else "stored, recorded, routed; processed where a routing rule says so")
        rows.append(f"| {title} | `{uid}` | SCP | {fate} |")
    return "\n".join(rows) + "\n"


def transfer_syntax_table() -> str:
    """Transfer syntaxes accepted for every storage SOP class, in order of preference."""
    rows = ["| Transfer Syntax | UID | Accepted for |", "|---|---|---|"]
    for uid in TRANSFER_SYNTAXES:
        rows.append(f"| {UID(uid).name} | `{uid}` | every storage SOP class above |")
    for uid in DEFAULT_TRANSFER_SYNTAXES:  # the SCP adds Verification with pynetdicom's defaults
        rows.append(f"| {UID(uid).name} | `{uid}` | Verification |")
    return "\n".join(rows) + "\n"


GENERATORS = {"sop-classes": sop_class_table, "transfer-syntaxes": transfer_syntax_table}


def render(document: str) -> str:
    """``document`` with every generated block made anew from the code; unknown block names are an error."""
    def block(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise ValueError(f"conformance document: no generator for block {name!r} (known: {list(GENERATORS)})")
        return f"{match.group(1)}{GENERATORS[name]()}{match.group(4)}"

    rendered, count = _BLOCK.subn(block, document)
    missing = set(GENERATORS) - set(m["name"] for m in _BLOCK.finditer(document))
    if count == 0 or missing:
        raise ValueError(f"conformance document lacks the generated blocks {sorted(missing)}")
    return rendered


def documented_rows(document: str, name: str) -> list[list[str]]:
    """The rows of one generated table of the document, as cells (UIDs without their backticks): what a reader of
    the statement is told."""
    for match in _BLOCK.finditer(document):
        if match["name"] == name:
            lines = [line for line in match["body"].splitlines() if line.startswith("|")][2:]
            return [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in lines]
    raise ValueError(f"conformance document has no generated block {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacs_bridge.conformance", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="FILE", help="regenerate the tables in FILE")
    action.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's tables differ from the code")
    args = parser.parse_args(argv)
    path = args.write or args.check
    text = path.read_text()
    rendered = render(text)
    if args.write:
        path.write_text(rendered)
        return 0
    if rendered != text:
        print(f"{path}: the generated tables differ from the code; run python -m pacs_bridge.conformance --write "
              f"{path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
