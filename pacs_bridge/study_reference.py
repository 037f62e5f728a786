"""Pseudonymous references to other studies: what an SR may say of a similar prior study of another patient.

A reference is ``prior-`` and the first 128 bits of HMAC-SHA256(site key, Study Instance UID), in hex. Without the
site key it tells nothing of the study (nor whether two sites cite the same one); with it, the worklist resolves it
for an authorised user by hashing the studies it may show (:func:`resolve`). The key stays on the site's servers
(``slice_evidence.reference_key_file``), never in an SR.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

PREFIX = "prior-"


def study_reference(key: bytes, study_instance_uid: str) -> str:
    """The pseudonymous reference of a study under the site key ``key``."""
    if len(key) < 16:
        raise ValueError("the study reference key must have at least 16 bytes")
    digest = hmac.new(key, study_instance_uid.encode("ascii"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:32]


def resolve(key: bytes, references: Iterable[str], candidates: Iterable[str]) -> dict[str, str]:
    """reference -> Study Instance UID, for the references that one of ``candidates`` (UIDs) has."""
    wanted = set(references)
    found: dict[str, str] = {}
    for uid in candidates:
        reference = study_reference(key, uid)
        if reference in wanted:
            found[reference] = uid
    return found
