"""The static API tokens, shared by every API replica through the database.

Tokens are read from the files and environment variables that ``api.tokens`` names (never from the configuration
itself) and written to the ``api_tokens`` table as SHA-256 hashes with their name and role. Every request looks its
token up there, so a token revoked by one replica (``POST /admin/tokens/reload``) is refused by all of them: at
once where ``api.token_cache_s`` is 0, otherwise within that many seconds (accepted lookups are cached that long
to spare the database one query per request).

What the configuration says is the truth: a reload makes the table hold exactly the tokens it names. An entry
removed from the file, or whose token file or variable is now empty or unreadable, has its token revoked (emptying
a token file is how an operator locks someone out); the reload says which entries it could not read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Engine

from sql.audit_schema import api_tokens
from sql.schema import utcnow

log = logging.getLogger(__name__)

#: radiologist: read; sender: store images (STOW-RS); admin: everything.
ROLES = ("radiologist", "sender", "admin")
#: Bounds the cache of accepted tokens (a handful of tokens in practice; OIDC tokens are not cached here).
_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


@dataclass(frozen=True)
class ConfiguredTokens:
    """What ``api.tokens`` yields: token hash -> principal, and the entries that could not be read."""

    by_hash: dict[str, Principal]
    problems: list[str] = field(default_factory=list)


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def read_configured_tokens(entries: list[dict], strict: bool) -> ConfiguredTokens:
    """The tokens ``api.tokens`` names. ``strict``: any entry that cannot be read raises (at start-up, a wrong
    configuration fails naming the entry); otherwise such entries are left out (so their old token is revoked)
    and listed in ``problems``."""
    by_hash: dict[str, Principal] = {}
    problems: list[str] = []
    for entry in entries:
        name = entry.get("name", "unnamed")
        try:
            if entry.get("role") not in ROLES:
                raise ValueError(f"api.tokens entry {name!r}: role must be one of {ROLES}")
            if "token_file" in entry:
                try:
                    secret = Path(entry["token_file"]).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"api.tokens entry {name!r}: cannot read {entry['token_file']}: "
                                     f"{exc.strerror or exc}") from exc
            elif "token_env" in entry:
                secret = os.environ.get(entry["token_env"], "").strip()
            else:
                raise ValueError(f"api.tokens entry {name!r} needs token_file or token_env")
            if not secret:
                raise ValueError(f"api.tokens entry {name!r}: the token is empty")
        except ValueError as exc:
            if strict:
                raise
            problems.append(str(exc))
            continue
        by_hash[token_hash(secret)] = Principal(str(name), entry["role"])
    return ConfiguredTokens(by_hash, problems)


class TokenStore:
    """Looks tokens up in ``api_tokens`` (with a short cache) and replaces the set from the configuration."""

    def __init__(self, engine: Engine, cache_s: float = 2.0) -> None:
        self.engine = engine
        self.cache_s = max(0.0, float(cache_s))
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def principal(self, secret: str) -> Principal | None:
        """The principal of a valid, unrevoked token, or None. Blocking (a database query): call from a thread."""
        digest = token_hash(secret)
        now = time.monotonic()
        if self.cache_s:
            with self._lock:
                cached = self._cache.get(digest)
            if cached is not None and cached[0] > now:
                return cached[1]
        with self.engine.connect() as connection:
            row = connection.execute(select(api_tokens.c.name, api_tokens.c.role).where(and_(
                api_tokens.c.token_hash == digest, api_tokens.c.revoked_at.is_(None)))).first()
        if row is None:
            with self._lock:
                self._cache.pop(digest, None)
            return None
        principal = Principal(row.name, row.role)
        if self.cache_s:
            with self._lock:
                if len(self._cache) >= _CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[digest] = (now + self.cache_s, principal)
        return principal

    def signing_keys(self, principal: Principal) -> list[str]:
        """The hashes of ``principal``'s valid static tokens: the keys its browser sessions are signed with, so a
        session ends, on every replica, with the token it was opened by. Empty for an OIDC principal."""
        with self.engine.connect() as connection:
            return list(connection.execute(select(api_tokens.c.token_hash).where(and_(
                api_tokens.c.name == principal.name, api_tokens.c.role == principal.role,
                api_tokens.c.revoked_at.is_(None))).order_by(api_tokens.c.id)).scalars())

    def replace(self, configured: ConfiguredTokens) -> dict:
        """Make the table hold exactly ``configured``: new tokens added, others revoked. Returns what changed."""
        now = utcnow()
        with self.engine.begin() as connection:
            rows = connection.execute(select(api_tokens.c.id, api_tokens.c.token_hash, api_tokens.c.name,
                                             api_tokens.c.role, api_tokens.c.revoked_at)).all()
            known = {row.token_hash: row for row in rows}
            revoked = []
            for row in rows:
                wanted = configured.by_hash.get(row.token_hash)
                if row.revoked_at is None and (wanted is None or (wanted.name, wanted.role) != (row.name, row.role)):
                    connection.execute(update(api_tokens).where(api_tokens.c.id == row.id).values(revoked_at=now))
                    revoked.append(row.name)
            added = []
            for digest, principal in configured.by_hash.items():
                row = known.get(digest)
                if row is None:
                    connection.execute(insert(api_tokens).values(token_hash=digest, name=principal.name,
                                                                 role=principal.role, created_at=now))
                    added.append(principal.name)
                elif row.revoked_at is not None or (row.name, row.role) != (principal.name, principal.role):
                    connection.execute(update(api_tokens).where(api_tokens.c.id == row.id).values(
                        name=principal.name, role=principal.role, created_at=now, revoked_at=None))
                    added.append(principal.name)
        with self._lock:
            self._cache.clear()
        if revoked or added:
            log.info("API tokens: %d added (%s), %d revoked (%s)", len(added), ", ".join(sorted(added)),
                     len(revoked), ", ".join(sorted(revoked)))
        return {"tokens": len(configured.by_hash),
                "principals": sorted({p.name for p in configured.by_hash.values()}),
                "added": sorted(added), "revoked": sorted(revoked), "problems": configured.problems}
