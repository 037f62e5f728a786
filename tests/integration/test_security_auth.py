"""Who may use the API, against real `triage api` processes: one reading of the Authorization header for the audit
log and the routes, tokens revoked for every replica, and OpenID Connect tokens from an identity provider."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import create_engine, select

from sql.audit_schema import audit_log
from tests.support.api_process import ApiProcess
from worker.api.oidc import OidcError, OidcVerifier
from worker.api.tokens import Principal

RADIOLOGIST_TOKEN = "tok-radiologist-" + "r" * 32
ADMIN_TOKEN = "tok-admin-" + "a" * 36
TOKENS = {"dr.grey": ("radiologist", RADIOLOGIST_TOKEN), "ops": ("admin", ADMIN_TOKEN)}


def audit_rows(database_url: str) -> list[dict]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as c:
            return [dict(r) for r in c.execute(select(audit_log).order_by(audit_log.c.id)).mappings()]
    finally:
        engine.dispose()


@pytest.fixture
def api(tmp_path):
    process = ApiProcess(tmp_path / "api", f"sqlite:///{tmp_path / 'api.db'}", TOKENS).start()
    yield process
    process.stop()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# --- finding 1: two Authorization headers ------------------------------------------------------------------

@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_a_request_with_two_authorization_headers_is_refused_and_audited(api, order):
    headers = [bearer(RADIOLOGIST_TOKEN), bearer("not-a-token")]
    if order == "valid last":
        headers.reverse()

    response = httpx.get(f"{api.url}/worklist/items", headers=headers)

    assert response.status_code == 400 and "more than one Authorization header" in response.text
    (entry,) = audit_rows(api.config["database"]["url"])
    assert (entry["path"], entry["status_code"], entry["action"], entry["principal"]) == \
        ("/worklist/items", 400, "denied", None)


# --- finding 2: revocation ---------------------------------------------------------------------------------

def reload(api: ApiProcess) -> httpx.Response:
    return httpx.post(f"{api.url}/admin/tokens/reload", headers=api.headers("ops"))


def test_emptying_a_token_file_and_reloading_revokes_that_token(api):
    assert httpx.get(f"{api.url}/worklist/items", headers=api.headers("dr.grey")).status_code == 200
    api.token_file("dr.grey").write_text("")

    response = reload(api)

    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == ["dr.grey"] and "the token is empty" in response.json()["problems"][0]
    assert httpx.get(f"{api.url}/worklist/items", headers=api.headers("dr.grey")).status_code == 401
    assert httpx.get(f"{api.url}/admin/config", headers=api.headers("ops")).status_code == 200  # others stay


def test_an_unreadable_token_file_revokes_that_token(api):
    api.token_file("dr.grey").unlink()
    response = reload(api)
    assert response.status_code == 200 and response.json()["revoked"] == ["dr.grey"]
    assert "cannot read" in response.json()["problems"][0]
    assert httpx.get(f"{api.url}/worklist/items", headers=api.headers("dr.grey")).status_code == 401


def test_removing_a_user_from_the_configuration_and_reloading_revokes_the_token(api):
    api.config["api"]["tokens"] = [e for e in api.config["api"]["tokens"] if e["name"] != "dr.grey"]
    api.write_config()

    response = reload(api)

    assert response.status_code == 200 and response.json()["revoked"] == ["dr.grey"], response.text
    assert httpx.get(f"{api.url}/worklist/items", headers=api.headers("dr.grey")).status_code == 401


def test_a_revocation_reloaded_on_one_replica_is_refused_by_the_other(tmp_path, postgres_url):
    first = ApiProcess(tmp_path / "a", postgres_url, TOKENS).start()
    second = ApiProcess(tmp_path / "b", postgres_url, TOKENS, migrate=False)
    try:
        second.start()
        assert httpx.get(f"{second.url}/worklist/items", headers=second.headers("dr.grey")).status_code == 200
        first.token_file("dr.grey").write_text("tok-rotated-" + "n" * 36)

        assert reload(first).json()["revoked"] == ["dr.grey"]

        # The second replica was never told; its next request asks the shared store.
        assert httpx.get(f"{second.url}/worklist/items", headers=second.headers("dr.grey")).status_code == 401
        rotated = {"Authorization": "Bearer tok-rotated-" + "n" * 36}
        assert httpx.get(f"{second.url}/worklist/items", headers=rotated).status_code == 200
    finally:
        second.stop()
        first.stop()


# --- OpenID Connect ----------------------------------------------------------------------------------------

ISSUER = "https://idp.hospital.test/realms/radiology"
AUDIENCE = "triage-api"


class IdentityProvider:
    """Signing keys of a test identity provider, with their JWKS served over HTTP on loopback."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = json.dumps({"keys": [{**jwk, "kid": "idp-1", "use": "sig", "alg": "RS256"}]}).encode()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(provider.jwks)))
                self.end_headers()
                self.wfile.write(provider.jwks)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.jwks_url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/radiology/certs"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, roles=("triage-radiologist",), key=None, algorithm="RS256", **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "f3a1", "preferred_username": "dr.house", "iat": now,
                "exp": now + 300, "realm_access": {"roles": list(roles)}, **claims}
        return jwt.encode(body, key or self.key, algorithm=algorithm, headers={"kid": "idp-1"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def oidc_api(tmp_path_factory):
    provider = IdentityProvider()
    folder = tmp_path_factory.mktemp("oidc")
    api = ApiProcess(folder, f"sqlite:///{folder / 'api.db'}", TOKENS, config={"api": {"oidc": {
        "issuer": ISSUER, "audience": AUDIENCE, "jwks_url": provider.jwks_url, "role_claim": "realm_access.roles",
        "role_map": {"triage-radiologist": "radiologist", "triage-admin": "admin"}}}}).start()
    yield api, provider
    api.stop()
    provider.close()


def test_an_identity_providers_token_is_accepted_with_its_role_and_named_in_the_audit_log(oidc_api):
    api, provider = oidc_api
    radiologist = {"Authorization": f"Bearer {provider.token()}"}
    admin = {"Authorization": f"Bearer {provider.token(roles=['triage-admin', 'offline_access'])}"}

    me = httpx.get(f"{api.url}/worklist/me", headers=radiologist)
    assert me.status_code == 200 and me.json() == {"name": "dr.house", "role": "radiologist"}
    assert httpx.get(f"{api.url}/admin/config", headers=radiologist).status_code == 403
    assert httpx.get(f"{api.url}/admin/config", headers=admin).status_code == 200
    entries = audit_rows(api.config["database"]["url"])
    assert [(e["principal"], e["role"], e["status_code"]) for e in entries[-3:]] == [
        ("dr.house", "radiologist", 200), ("dr.house", "radiologist", 403), ("dr.house", "admin", 200)]


def forged_tokens(provider: IdentityProvider) -> dict[str, str]:
    now = int(time.time())
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300,
                           "realm_access": {"roles": ["triage-admin"]}}, None, algorithm="none")
    return {
        "another audience": provider.token(aud="some-other-api"),
        "another issuer": provider.token(iss="https://evil.test/realms/radiology"),
        "expired": provider.token(exp=now - 3600, iat=now - 7200),
        "signed by another key": provider.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "unsigned (alg none)": unsigned,
        "no role of ours": provider.token(roles=["offline_access"]),
    }


@pytest.mark.parametrize("case", ["another audience", "another issuer", "expired", "signed by another key",
                                  "unsigned (alg none)", "no role of ours"])
def test_an_identity_providers_token_that_is_not_for_us_is_refused(oidc_api, case):
    api, provider = oidc_api
    token = forged_tokens(provider)[case]
    response = httpx.get(f"{api.url}/worklist/items", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, (case, response.text)


def test_keys_from_a_jwks_file_and_asymmetric_algorithms_only(tmp_path):
    provider = IdentityProvider()
    provider.close()
    (tmp_path / "jwks.json").write_bytes(provider.jwks)
    verifier = OidcVerifier({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(tmp_path / "jwks.json"),
                             "role_claim": "realm_access.roles", "role_map": {"triage-admin": "admin"}})
    assert verifier.principal(provider.token(roles=["triage-admin"])) == Principal("dr.house", "admin")
    with pytest.raises(OidcError):
        verifier.principal(provider.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(ValueError, match="asymmetric only"):
        OidcVerifier({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(tmp_path / "jwks.json"),
                      "algorithms": ["HS256"]})
