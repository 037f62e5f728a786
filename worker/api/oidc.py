"""OpenID Connect bearer tokens: the hospital's identity provider signs a JWT access token, we check it.

Configured in ``api.oidc``: the issuer (``iss`` must equal it), the audience (``aud`` must contain it), the signing
keys (a JWKS from ``jwks_url``, fetched and cached by PyJWT and fetched again for an unknown key id, or from
``jwks_file``), the accepted algorithms (asymmetric only: a shared-secret algorithm would let anyone holding the
public key sign), and where the role is: ``role_claim`` (a dotted path such as ``realm_access.roles``; a string
or a list) mapped through ``role_map`` (the provider's names -> ours; our own role names are accepted as they
are). A token with several of our roles gets the strongest. ``name_claim`` names the principal in the audit log.

Tokens cannot be revoked here: they expire (``exp`` is required), and the provider stops issuing them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jwt

from worker.api.tokens import ROLES, Principal
from worker.config import ApiSettings

log = logging.getLogger(__name__)

#: Only asymmetric algorithms: the verification key is public.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
#: Strongest first: a token that carries several of our roles acts as the first one found here.
_ROLE_ORDER = ("admin", "radiologist", "sender")


class OidcError(ValueError):
    """A bearer token that is a JWT but not one we accept; the message says why (logged, not sent)."""


class OidcVerifier:
    def __init__(self, oidc: dict) -> None:
        self.issuer = str(oidc.get("issuer") or "")
        self.audience = str(oidc.get("audience") or "")
        if not self.issuer or not self.audience:
            raise ValueError("api.oidc needs issuer and audience")
        self.algorithms = [str(a) for a in oidc.get("algorithms") or ("RS256", "ES256")]
        unsafe = [a for a in self.algorithms if a not in ALLOWED_ALGORITHMS]
        if unsafe:
            raise ValueError(f"api.oidc.algorithms: {unsafe} not allowed (asymmetric only: {ALLOWED_ALGORITHMS})")
        self.role_claim = str(oidc.get("role_claim") or "roles")
        self.name_claim = str(oidc.get("name_claim") or "preferred_username")
        self.role_map = {str(k): str(v) for k, v in (oidc.get("role_map") or {}).items()}
        bad = sorted(set(self.role_map.values()) - set(ROLES))
        if bad:
            raise ValueError(f"api.oidc.role_map maps to unknown roles {bad}; roles are {ROLES}")
        self.leeway_s = float(oidc.get("leeway_s", 30))
        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if oidc.get("jwks_url"):
            self._client = jwt.PyJWKClient(str(oidc["jwks_url"]), cache_keys=True,
                                           lifespan=int(oidc.get("jwks_cache_s", 300)),
                                           timeout=int(oidc.get("jwks_timeout_s", 5)))
        elif oidc.get("jwks_file"):
            self._keys = jwt.PyJWKSet.from_dict(json.loads(Path(oidc["jwks_file"]).read_text()))
        else:
            raise ValueError("api.oidc needs jwks_url or jwks_file")

    def _signing_key(self, token: str) -> Any:
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token).key
        kid = jwt.get_unverified_header(token).get("kid")
        keys = [k for k in self._keys.keys if kid is None or k.key_id == kid]
        if not keys:
            raise OidcError(f"no key {kid!r} in api.oidc.jwks_file")
        return keys[0].key

    def principal(self, token: str) -> Principal:
        """The principal of a valid token; raises :class:`OidcError` otherwise. Blocking (may fetch the JWKS)."""
        try:
            claims = jwt.decode(token, self._signing_key(token), algorithms=self.algorithms,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway_s,
                                options={"require": ["exp", "iss", "aud"]})
        except (jwt.PyJWTError, ValueError, KeyError) as exc:
            raise OidcError(f"{type(exc).__name__}: {exc}") from exc
        role = self._role(claims)
        name = claims.get(self.name_claim) or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise OidcError(f"the token has no {self.name_claim} or sub claim")
        return Principal(name[:128], role)

    def _role(self, claims: dict) -> str:
        value: Any = claims
        for step in self.role_claim.split("."):
            value = value.get(step) if isinstance(value, dict) else None
        values = [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)] \
            if isinstance(value, list) else []
        ours = {self.role_map.get(v, v) for v in values} & set(ROLES)
        for role in _ROLE_ORDER:
            if role in ours:
                return role
        raise OidcError(f"the token's {self.role_claim} claim names none of our roles ({values[:5]})")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def verifier_from_settings(api_settings: ApiSettings) -> OidcVerifier | None:
    oidc = api_settings.oidc.model_dump()
    return OidcVerifier(oidc) if oidc.get("issuer") else None
