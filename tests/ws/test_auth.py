"""Handshake authentication: JWT and session authenticators, origin checks, identity and expiry."""

from __future__ import annotations

import dataclasses
import hmac
import json
import socket
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.datastructures import Headers
from websockets.http11 import Request

from dotmac.communications.config import CommunicationsConfig, WebSocketsSettings
from dotmac.communications.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    MissingCredentialsError,
    WebSocketError,
)
from dotmac.communications.testing import FakeClock
from dotmac.communications.websockets._auth import (
    AnonymousAuthenticator,
    Authenticator,
    ChainAuthenticator,
    HandshakeRequest,
    Identity,
    JWTAuthenticator,
    SessionAuthenticator,
    check_origin,
    token_expiry_delay,
    validate_allowed_origins,
)

SECRET = "k" * 32  # HS256 needs at least 32 bytes (RFC 7518 §3.2)
NOW = 1_700_000_000.0  # FakeClock's wall-clock start


# --------------------------------------------------------------------------------------- helpers
def _pem_public(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def _pem_private(key: Any) -> str:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem.decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u1", "exp": int(NOW) + 600, "tenant_id": "t1"}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def token(payload: Mapping[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(dict(claims() if payload is None else payload), key, algorithm=alg)


def req(path: str = "/ws", headers: Any = ()) -> HandshakeRequest:
    return HandshakeRequest.from_path_and_headers(path, headers)


def bearer(value: str) -> HandshakeRequest:
    return req(headers={"Authorization": f"Bearer {value}"})


@pytest.fixture
def auth(clock: FakeClock) -> JWTAuthenticator:
    return JWTAuthenticator(SECRET, clock=clock)


async def refused(authenticator: Authenticator, request: HandshakeRequest) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await authenticator.authenticate(request)
    assert info.value.status == 401
    return info.value


# -------------------------------------------------------------------------------------- identity
def test_identity_defaults_to_anonymous_and_normalises_fields() -> None:
    """Identity() is anonymous; roles become a frozenset and claims a read-only copy."""
    assert Identity().anonymous
    source = {"sub": "u1"}
    identity = Identity("u1", roles=["a", "b", "a"], claims=source)
    source["sub"] = "changed"
    assert not identity.anonymous
    assert identity.roles == frozenset({"a", "b"})
    assert identity.claims["sub"] == "u1"
    with pytest.raises(TypeError):
        identity.claims["sub"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.user_id = "u2"  # type: ignore[misc]
    assert "claims" not in repr(identity)
    renewed = dataclasses.replace(identity, expires_at=NOW)
    assert (renewed.user_id, renewed.roles, renewed.expires_at) == (
        "u1",
        frozenset({"a", "b"}),
        NOW,
    )
    assert renewed.claims == {"sub": "u1"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"user_id": ""}, ValueError),
        ({"tenant_id": ""}, ValueError),
        ({"user_id": 5}, TypeError),
        ({"tenant_id": 7}, TypeError),
        ({"expires_at": float("inf")}, ValueError),
        ({"roles": "admin"}, TypeError),
        ({"roles": [1]}, TypeError),
    ],
)
def test_identity_refuses_bad_values(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Empty or non-string ids, infinite expiry and a bare-string or non-string roles are refused."""
    with pytest.raises(error):
        Identity(**kwargs)


def test_token_expiry_delay() -> None:
    """None without expiry, the seconds left otherwise, never negative."""
    assert token_expiry_delay(Identity("u"), NOW) is None
    assert token_expiry_delay(Identity("u", expires_at=NOW + 12.5), NOW) == 12.5
    assert token_expiry_delay(Identity("u", expires_at=NOW - 5), NOW) == 0.0


def test_authentication_error_status_must_be_4xx() -> None:
    """AuthenticationError is a WebSocketError whose status defaults to 401 and must be 4xx."""
    assert AuthenticationError("x").status == 401
    assert isinstance(MissingCredentialsError("x"), WebSocketError)
    with pytest.raises(ValueError, match="4xx"):
        AuthenticationError("x", status=500)


# --------------------------------------------------------------------------------------- request
def test_request_from_path_splits_and_decodes_the_query() -> None:
    """The query string is split off the path, percent-decoded, the first repeated name wins."""
    request = req("/ws?token=a%2Bb&x=1&token=second&empty=")
    assert request.path == "/ws"
    assert dict(request.query) == {"token": "a+b", "x": "1", "empty": ""}


@pytest.mark.parametrize(
    "headers",
    [
        Headers(origin="https://a.test"),
        {"ORIGIN": "https://a.test"},
        [("Origin", "https://a.test")],
    ],
    ids=["Headers", "mapping", "pairs"],
)
def test_request_headers_are_case_insensitive(headers: Any) -> None:
    """Headers given as websockets Headers, a mapping or pairs are looked up case-insensitively."""
    assert req(headers=headers).headers.get_all("origin") == ["https://a.test"]


def test_request_from_a_websockets_request() -> None:
    """A websockets server Request converts with its path (query included) and headers."""
    upgrade = Request("/ws?token=t", Headers({"Authorization": "Bearer x"}))
    request = HandshakeRequest.from_path_and_headers(upgrade.path, upgrade.headers, ("::1", 5))
    assert request.query == {"token": "t"}
    assert request.headers["authorization"] == "Bearer x"
    assert request.remote_address == ("::1", 5)


@pytest.mark.parametrize(
    ("cookie_headers", "expected"),
    [
        (["a=1; b c=2; session=x"], {"a": "1", "b c": "2", "session": "x"}),
        (["path=1; session=2"], {"path": "1", "session": "2"}),
        (['session="a\\"b"; x=1'], {"session": 'a"b', "x": "1"}),
        (["junk;; =v; session=s=s; session=later"], {"session": "s=s"}),
        (["a=1", "session=from-second-header"], {"a": "1", "session": "from-second-header"}),
        ([], {}),
    ],
    ids=["space-in-name", "reserved-name", "quoted", "junk", "two-headers", "none"],
)
def test_cookies_parse_tolerantly(cookie_headers: list[str], expected: dict[str, str]) -> None:
    """One malformed cookie never hides the session cookie; quoted values are unquoted."""
    request = req(headers=[("Cookie", value) for value in cookie_headers])
    assert dict(request.cookies) == expected


def test_offered_subprotocols_span_headers() -> None:
    """Every Sec-WebSocket-Protocol header is split on commas, blanks dropped."""
    request = req(headers=[("Sec-WebSocket-Protocol", "a, b,"), ("Sec-WebSocket-Protocol", "c")])
    assert request.offered_subprotocols == ["a", "b", "c"]


# ----------------------------------------------------------------------------- JWT: token sources
async def test_jwt_identity_from_claims(auth: JWTAuthenticator) -> None:
    """sub, tenant_id, roles and exp (+ leeway) become the identity; claims are kept."""
    identity = await auth.authenticate(bearer(token(claims(roles=["admin", "ops"], extra=1))))
    assert identity.user_id == "u1"
    assert identity.tenant_id == "t1"
    assert identity.roles == frozenset({"admin", "ops"})
    assert identity.expires_at == NOW + 600 + 30
    assert identity.claims["extra"] == 1
    assert identity.subprotocol is None
    assert isinstance(auth, Authenticator)


@pytest.mark.parametrize(
    ("make", "subprotocol"),
    [
        (lambda t: req(headers={"Authorization": f"bearer   {t} "}), None),
        (lambda t: req(f"/ws?token={t}"), None),
        (lambda t: req(headers={"Sec-WebSocket-Protocol": f"bearer, {t}"}), "bearer"),
        (lambda t: req(headers={"Sec-WebSocket-Protocol": f"dotmac.v1, bearer, {t}"}), "bearer"),
    ],
    ids=["authorization", "query", "subprotocol", "subprotocol-after-another"],
)
async def test_jwt_token_sources(auth: JWTAuthenticator, make: Any, subprotocol: Any) -> None:
    """The token is read from Authorization, ?token= or the entry after the bearer marker."""
    identity = await auth.authenticate(make(token()))
    assert identity.user_id == "u1"
    assert identity.subprotocol == subprotocol


async def test_jwt_authorization_wins_over_query(auth: JWTAuthenticator) -> None:
    """With several sources the Authorization header is used; the marker is still echoed."""
    request = req(
        "/ws?token=garbage",
        {"Authorization": f"Bearer {token()}", "Sec-WebSocket-Protocol": "bearer, garbage"},
    )
    identity = await auth.authenticate(request)
    assert identity.user_id == "u1"
    assert identity.subprotocol == "bearer"


async def test_jwt_other_authorization_schemes_are_ignored(auth: JWTAuthenticator) -> None:
    """A Basic Authorization header is skipped: the query token is used, else none is found."""
    basic = {"Authorization": "Basic dTpw"}
    assert (await auth.authenticate(req(f"/ws?token={token()}", basic))).user_id == "u1"
    with pytest.raises(MissingCredentialsError):
        await auth.authenticate(req(headers=basic))


async def test_jwt_missing_token(auth: JWTAuthenticator) -> None:
    """No token anywhere is a MissingCredentialsError (an AuthenticationError, status 401)."""
    error = await refused(auth, req(headers={"Sec-WebSocket-Protocol": "dotmac.v1"}))
    assert isinstance(error, MissingCredentialsError)


async def test_jwt_disabled_sources(clock: FakeClock) -> None:
    """query_param=None and subprotocol=None disable those sources."""
    auth = JWTAuthenticator(SECRET, query_param=None, subprotocol=None, clock=clock)
    for request in (
        req(f"/ws?token={token()}"),
        req(headers={"Sec-WebSocket-Protocol": f"bearer, {token()}"}),
    ):
        with pytest.raises(MissingCredentialsError):
            await auth.authenticate(request)


@pytest.mark.parametrize(
    "request_",
    [
        req(headers={"Authorization": "Bearer"}),
        req(headers={"Authorization": "Bearer a b"}),
        req(headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")]),
        req("/ws?token="),
        req(headers={"Sec-WebSocket-Protocol": "dotmac.v1, bearer"}),
        bearer("not-a-jwt"),
        bearer("a.b.c"),
    ],
    ids=["empty-bearer", "two-words", "two-headers", "empty-query", "marker-last", "junk", "abc"],
)
async def test_jwt_malformed_credentials_are_refused(
    auth: JWTAuthenticator, request_: HandshakeRequest
) -> None:
    """A credential that is present but malformed is a 401, not a missing credential."""
    error = await refused(auth, request_)
    assert not isinstance(error, MissingCredentialsError)
    assert "JWT refused" in str(error)


# ------------------------------------------------------------------------------- JWT: refusals
async def test_jwt_expiry_honours_the_leeway_boundary(clock: FakeClock) -> None:
    """A token is accepted until exp + leeway (exclusive), refused from that instant on."""
    auth = JWTAuthenticator(SECRET, leeway=30, clock=clock)
    request = bearer(token(claims(exp=int(NOW) + 10)))
    clock.advance(10 + 30 - 0.001)
    identity = await auth.authenticate(request)
    assert token_expiry_delay(identity, clock.time()) == pytest.approx(0.001, abs=1e-6)
    clock.advance(0.001)
    assert "expired" in str(await refused(auth, request))


async def test_jwt_expired_without_leeway(clock: FakeClock) -> None:
    """With leeway=0 a token is refused at exp exactly."""
    auth = JWTAuthenticator(SECRET, leeway=0, clock=clock)
    assert "expired" in str(await refused(auth, bearer(token(claims(exp=int(NOW))))))


@pytest.mark.parametrize("name", ["nbf", "iat"])
async def test_jwt_not_yet_valid(auth: JWTAuthenticator, name: str) -> None:
    """nbf / iat later than now + leeway are refused; within the leeway they pass."""
    assert (await auth.authenticate(bearer(token(claims(**{name: int(NOW) + 30}))))).user_id
    error = await refused(auth, bearer(token(claims(**{name: int(NOW) + 31}))))
    assert "not yet valid" in str(error)


async def test_jwt_bad_signature(auth: JWTAuthenticator) -> None:
    """A token signed with another secret, or with a tampered payload, is refused."""
    await refused(auth, bearer(token(key="x" * 32)))
    header, _, signature = token().split(".")
    forged_payload = token(claims(sub="admin"), key="y" * 32).split(".")[1]
    await refused(auth, bearer(f"{header}.{forged_payload}.{signature}"))


async def test_jwt_audience(clock: FakeClock) -> None:
    """aud must match the configured audience (one of a list); missing or other aud is refused."""
    auth = JWTAuthenticator(SECRET, audience=["ws", "api"], clock=clock)
    assert (await auth.authenticate(bearer(token(claims(aud="api"))))).user_id == "u1"
    assert "audience" in str(await refused(auth, bearer(token(claims(aud="other"))))).lower()
    assert "aud" in str(await refused(auth, bearer(token())))


async def test_jwt_with_aud_refused_when_no_audience_configured(auth: JWTAuthenticator) -> None:
    """A token meant for some audience is refused by an authenticator configured with none."""
    await refused(auth, bearer(token(claims(aud="ws"))))


async def test_jwt_issuer(clock: FakeClock) -> None:
    """iss must match the configured issuer; a wrong or missing iss is refused."""
    auth = JWTAuthenticator(SECRET, issuer="https://idp.test", clock=clock)
    assert (await auth.authenticate(bearer(token(claims(iss="https://idp.test"))))).user_id
    assert "issuer" in str(await refused(auth, bearer(token(claims(iss="https://evil.test")))))
    assert "iss" in str(await refused(auth, bearer(token())))


async def test_jwt_alg_none_is_refused(auth: JWTAuthenticator) -> None:
    """An unsigned token (alg none) is refused."""
    unsigned = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    assert "alg" in str(await refused(auth, bearer(unsigned)))


async def test_jwt_alg_not_in_the_list_is_refused(auth: JWTAuthenticator) -> None:
    """A token signed with an algorithm outside the accepted list (HS512 for HS256) is refused."""
    await refused(auth, bearer(token(key="k" * 64, alg="HS512")))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (claims(sub=None), "sub"),
        (claims(sub=""), "sub"),
        (claims(sub=42), "Subject"),
        (claims(exp=None), "exp"),
        (claims(exp="soon"), "exp claim is not a number"),
        (claims(exp=True), "exp claim is not a number"),
        (claims(nbf="now"), "nbf claim is not a number"),
        (claims(tenant_id=["t"]), "tenant_id"),
        (claims(tenant_id=""), "tenant_id"),
        (claims(roles=7), "roles"),
        (claims(roles=["a", 1]), "roles"),
    ],
    ids=[
        "no-sub", "empty-sub", "int-sub", "no-exp", "str-exp", "bool-exp", "str-nbf",
        "list-tenant", "empty-tenant", "int-roles", "mixed-roles",
    ],
)  # fmt: skip
async def test_jwt_bad_claims_are_refused(
    auth: JWTAuthenticator, payload: dict[str, Any], message: str
) -> None:
    """Missing sub or exp, and claims of the wrong type, refuse the token."""
    assert message in str(await refused(auth, bearer(token(payload))))


async def test_jwt_without_exp_when_not_required(clock: FakeClock) -> None:
    """require_exp=False accepts a token without exp; the identity never expires."""
    auth = JWTAuthenticator(SECRET, require_exp=False, clock=clock)
    identity = await auth.authenticate(bearer(token(claims(exp=None))))
    assert identity.expires_at is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], {"a", "b"}),
        ("read  write\tadmin", {"read", "write", "admin"}),
        ("", set()),
        (None, set()),
    ],
    ids=["list", "space-separated", "empty", "absent"],
)
async def test_jwt_roles_parsing(auth: JWTAuthenticator, value: Any, expected: set[str]) -> None:
    """roles is a list of strings or one space-separated string; absent means no roles."""
    identity = await auth.authenticate(bearer(token(claims(roles=value))))
    assert identity.roles == expected


async def test_jwt_custom_tenant_and_roles_claims(clock: FakeClock) -> None:
    """tenant_claim and roles_claim pick other claims; an integer tenant id becomes a string."""
    auth = JWTAuthenticator(SECRET, tenant_claim="org", roles_claim="scope", clock=clock)
    identity = await auth.authenticate(bearer(token(claims(tenant_id=None, org=7, scope="r w"))))
    assert identity.tenant_id == "7"
    assert identity.roles == {"r", "w"}


async def test_jwt_es256_with_a_pem_public_key(
    clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """ES256 tokens verify with the PEM public key; another key's signature is refused."""
    auth = JWTAuthenticator(_pem_public(ec_key), algorithms=["ES256"], clock=clock)
    assert (await auth.authenticate(bearer(token(key=ec_key, alg="ES256")))).user_id == "u1"
    other = ec.generate_private_key(ec.SECP256R1())
    await refused(auth, bearer(token(key=other, alg="ES256")))


async def test_jwt_rs256_with_a_key_object(clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    """RS256/PS256 tokens verify with a cryptography public-key object."""
    auth = JWTAuthenticator(rsa_key.public_key(), algorithms=["RS256", "PS256"], clock=clock)
    for alg in ("RS256", "PS256"):
        assert (await auth.authenticate(bearer(token(key=rsa_key, alg=alg)))).user_id == "u1"


async def test_jwt_algorithm_confusion_is_refused(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An HS256 token MACed with the (public) RSA key is refused by an RS256 authenticator."""
    public_pem = _pem_public(rsa_key)
    auth = JWTAuthenticator(public_pem, algorithms=["RS256"], clock=clock)
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signing_input = header + b"." + payload
    mac = hmac.new(public_pem.encode(), signing_input, "sha256").digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()
    await refused(auth, bearer(forged))


def test_jwt_configuration_errors(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """Unusable keys and algorithm lists are refused when the authenticator is built."""
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (SECRET, {"algorithms": []}, "empty"),
        (SECRET, {"algorithms": ["none"]}, "'none'"),
        (SECRET, {"algorithms": ["HS256", "NONE"]}, "'none'"),
        (SECRET, {"algorithms": ["XX256"]}, "one family"),
        (SECRET, {"algorithms": ["HS256", "RS256"]}, "one family"),
        (SECRET, {"leeway": -1}, "leeway"),
        ("", {}, "empty"),
        ("short", {}, "HMAC key"),
        (_pem_public(rsa_key), {}, "not usable for HS256"),
        (_pem_private(rsa_key), {"algorithms": ["RS256"]}, "PUBLIC key"),
        (_pem_public(ec_key), {"algorithms": ["RS256"]}, "not usable for RS256"),
        ("not a pem", {"algorithms": ["ES256"]}, "not usable for ES256"),
        (ed25519.Ed25519PrivateKey.generate(), {"algorithms": ["EdDSA"]}, "PUBLIC key"),
        (SECRET, {"query_param": ""}, "query_param=None"),
        (SECRET, {"subprotocol": ""}, "subprotocol=None"),
    ]
    for key, kwargs, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            JWTAuthenticator(key, **kwargs)
    assert JWTAuthenticator("k" * 48, algorithms="HS384").algorithms == ("HS384",)


def test_jwt_refuses_a_weak_rsa_key() -> None:
    """An RSA key under 2048 bits is refused at construction."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    with pytest.raises(ConfigurationError, match="2048"):
        JWTAuthenticator(weak.public_key(), algorithms=["RS256"])


async def test_jwt_from_config(clock: FakeClock) -> None:
    """from_config uses jwt_secret, jwt_algorithms and jwt_audience; no secret is an error."""
    with pytest.raises(ConfigurationError, match="jwt_secret"):
        JWTAuthenticator.from_config(WebSocketsSettings())
    settings = WebSocketsSettings(jwt_secret=SECRET, jwt_algorithms="HS256", jwt_audience="ws")
    auth = JWTAuthenticator.from_config(settings, clock=clock)
    assert auth.algorithms == ("HS256",)
    assert (await auth.authenticate(bearer(token(claims(aud="ws"))))).user_id == "u1"
    await refused(auth, bearer(token()))


# -------------------------------------------------------------------------------------- sessions
def cookie(value: str, name: str = "session") -> HandshakeRequest:
    return req(headers={"Cookie": f"theme=dark; {name}={value}"})


async def test_session_resolve_callable(clock: FakeClock) -> None:
    """The resolver gets the cookie's session id; its record becomes the identity."""
    seen: list[str] = []

    async def resolve(session_id: str) -> Mapping[str, Any] | None:
        seen.append(session_id)
        return {"user_id": 5, "tenant_id": "t", "roles": "a b", "expires_at": NOW + 60, "x": 1}

    auth = SessionAuthenticator(resolve, cookie_name="sid", clock=clock)
    identity = await auth.authenticate(cookie("abc", name="sid"))
    assert seen == ["abc"]
    assert identity == Identity("5", "t", frozenset({"a", "b"}), NOW + 60)
    assert identity.claims["x"] == 1
    assert isinstance(auth, Authenticator)


async def test_session_resolver_may_return_an_identity(clock: FakeClock) -> None:
    """A ready Identity from the resolver is used as is."""
    ready = Identity("u1", roles={"admin"})

    async def resolve(session_id: str) -> Identity:
        return ready

    assert await SessionAuthenticator(resolve, clock=clock).authenticate(cookie("s")) is ready


@pytest.mark.parametrize(
    "found",
    [None, {"user_id": "u", "expires_at": NOW}, Identity("u", expires_at=NOW - 1)],
    ids=["unknown", "expired-record", "expired-identity"],
)
async def test_session_unknown_or_expired(clock: FakeClock, found: Any) -> None:
    """An unknown session, or one at or past expires_at, is a 401."""

    async def resolve(session_id: str) -> Any:
        return found

    await refused(SessionAuthenticator(resolve, clock=clock), cookie("s"))


@pytest.mark.parametrize(
    "request_",
    [req(), req(headers={"Cookie": "other=1"}), cookie("")],
    ids=["no-cookie-header", "other-cookie", "empty-value"],
)
async def test_session_missing_cookie(request_: HandshakeRequest) -> None:
    """No (or an empty) session cookie is a MissingCredentialsError; the resolver is not called."""

    async def resolve(session_id: str) -> None:
        raise AssertionError("must not be called")

    with pytest.raises(MissingCredentialsError):
        await SessionAuthenticator(resolve).authenticate(request_)


async def test_session_id_too_long() -> None:
    """A session id over 1024 characters is refused without a lookup."""

    async def resolve(session_id: str) -> None:
        raise AssertionError("must not be called")

    await refused(SessionAuthenticator(resolve), cookie("x" * 1025))


@pytest.mark.parametrize(
    "found",
    [
        {"tenant_id": "t"},
        {"user_id": ""},
        {"user_id": "u", "roles": 3},
        {"user_id": "u", "expires_at": "tomorrow"},
        ["u"],
        Identity(),
    ],
    ids=["no-user", "empty-user", "bad-roles", "bad-expiry", "list", "anonymous-identity"],
)
async def test_session_malformed_records(found: Any) -> None:
    """A record of the wrong shape is a permanent BackendError, not a client error."""

    async def resolve(session_id: str) -> Any:
        return found

    with pytest.raises(BackendError) as info:
        await SessionAuthenticator(resolve).authenticate(cookie("s"))
    assert info.value.transient is False


async def test_session_configuration_errors(redis_url: str) -> None:
    """Exactly one session source, a matchable cookie name and a finite timeout > 0 are required."""

    async def resolve(session_id: str) -> None:
        return None

    client = aioredis.Redis.from_url(redis_url)
    try:
        for kwargs, message in (
            ({}, "got none"),
            ({"resolve": resolve, "redis_url": redis_url}, "got resolve and redis_url"),
            ({"redis_url": redis_url, "redis_client": client}, "got redis_url and redis_client"),
            ({"resolve": resolve, "cookie_name": ""}, "cookie_name '' can never match"),
            ({"resolve": resolve, "cookie_name": "sid=x"}, "can never match"),
            ({"resolve": resolve, "cookie_name": "a;b"}, "can never match"),
            ({"resolve": resolve, "cookie_name": " sid"}, "can never match"),
            ({"resolve": resolve, "timeout": 0}, "timeout"),
            ({"resolve": resolve, "timeout": float("inf")}, "finite"),
            ({"resolve": resolve, "timeout": float("nan")}, "finite"),
            ({"redis_url": "http://nope"}, "scheme"),
        ):
            with pytest.raises(ConfigurationError, match=message):
                SessionAuthenticator(**kwargs)
    finally:
        await client.aclose()


async def test_session_from_config_with_a_resolver(clock: FakeClock) -> None:
    """from_config reads session_cookie; a given resolver wins over a configured redis_url."""
    seen: list[str] = []

    async def resolve(session_id: str) -> Mapping[str, Any]:
        seen.append(session_id)
        return {"user_id": "u7"}

    settings = WebSocketsSettings(session_cookie="sid", redis_url="redis://127.0.0.1:1/0")
    auth = SessionAuthenticator.from_config(settings, resolve, clock=clock)
    assert auth.cookie_name == "sid"
    assert (await auth.authenticate(cookie("abc", name="sid"))).user_id == "u7"
    with pytest.raises(MissingCredentialsError, match="'sid'"):
        await auth.authenticate(cookie("abc"))
    assert seen == ["abc"]
    await auth.aclose()  # nothing to close: no Redis client was created


def test_session_from_config_without_resolver_or_redis_url() -> None:
    """Without a resolver, from_config needs websockets.redis_url and says so."""
    with pytest.raises(ConfigurationError, match=r"websockets\.redis_url.*resolve"):
        SessionAuthenticator.from_config(WebSocketsSettings())


@pytest.mark.redis
async def test_session_from_config_with_the_redis_store(
    redis_url: str, aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """session_cookie and session_prefix pick the cookie and the keys; redis_url is inherited."""
    await aredis.set("app:sess:abc", json.dumps({"user_id": "u1", "tenant_id": "t1"}))
    await aredis.set("session:abc", json.dumps({"user_id": "decoy"}))
    config = CommunicationsConfig(
        redis_url=redis_url,
        websockets={"session_cookie": "sid", "session_prefix": "app:sess:"},
    )
    async with SessionAuthenticator.from_config(config.websockets, clock=clock) as auth:
        assert (auth.cookie_name, auth.key_prefix) == ("sid", "app:sess:")
        identity = await auth.authenticate(cookie("abc", name="sid"))
        assert (identity.user_id, identity.tenant_id) == ("u1", "t1")
        with pytest.raises(MissingCredentialsError):
            await auth.authenticate(cookie("abc"))  # the default cookie name is not read
        await refused(auth, cookie("other", name="sid"))


@pytest.mark.redis
async def test_session_from_config_chained_after_jwt(
    redis_url: str, aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """The documented chain: a JWT when present, else the session cookie from the Redis store."""
    await aredis.set("session:s1", json.dumps({"user_id": "from-session"}))
    settings = WebSocketsSettings(jwt_secret=SECRET, redis_url=redis_url)
    async with SessionAuthenticator.from_config(settings, clock=clock) as sessions:
        chain = ChainAuthenticator(JWTAuthenticator.from_config(settings, clock=clock), sessions)
        assert (await chain.authenticate(bearer(token()))).user_id == "u1"
        assert (await chain.authenticate(cookie("s1"))).user_id == "from-session"
        await refused(chain, bearer(token(key="x" * 32)))  # a bad token never falls through


@pytest.mark.redis
async def test_session_redis_store(
    redis_url: str, aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """GET {prefix}{id} JSON becomes the identity; missing and expired sessions are 401."""
    await aredis.set("app:sess:good", json.dumps({"user_id": "u1", "roles": ["r"]}))
    await aredis.set("app:sess:old", json.dumps({"user_id": "u1", "expires_at": NOW - 1}))
    async with SessionAuthenticator(
        redis_url=redis_url, key_prefix="app:sess:", clock=clock
    ) as auth:
        identity = await auth.authenticate(cookie("good"))
        assert (identity.user_id, identity.roles, identity.expires_at) == (
            "u1",
            frozenset({"r"}),
            None,
        )
        await refused(auth, cookie("missing"))
        await refused(auth, cookie("old"))


@pytest.mark.redis
@pytest.mark.parametrize("raw", [b"\xff not json", b"[1, 2]"], ids=["not-json", "not-object"])
async def test_session_redis_malformed_value(
    redis_url: str, aredis: aioredis.Redis, raw: bytes
) -> None:
    """A value that is not a JSON object is a permanent BackendError."""
    await aredis.set("session:s", raw)
    async with SessionAuthenticator(redis_url=redis_url) as auth:
        with pytest.raises(BackendError) as info:
            await auth.authenticate(cookie("s"))
    assert info.value.transient is False


@pytest.mark.redis
async def test_session_injected_client_stays_open(redis_url: str) -> None:
    """An injected client (decoding responses to str) works and is not closed by aclose."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.set("session:s", json.dumps({"user_id": "u9"}))
        auth = SessionAuthenticator(redis_client=client)
        assert (await auth.authenticate(cookie("s"))).user_id == "u9"
        await auth.aclose()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_session_redis_unreachable() -> None:
    """Redis refusing connections is a transient BackendUnavailableError (the gateway: 503)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with SessionAuthenticator(redis_url=f"redis://127.0.0.1:{port}/0", timeout=2) as auth:
        with pytest.raises(BackendUnavailableError) as info:
            await auth.authenticate(cookie("s"))
    assert info.value.transient is True


# ------------------------------------------------------------------------------ chain, anonymous
async def test_chain_falls_through_only_on_missing_credentials(clock: FakeClock) -> None:
    """No credential reaches the next authenticator; an invalid one is never downgraded."""

    async def resolve(session_id: str) -> Mapping[str, Any]:
        return {"user_id": "from-session"}

    chain = ChainAuthenticator(
        JWTAuthenticator(SECRET, clock=clock),
        SessionAuthenticator(resolve),
        AnonymousAuthenticator(),
    )
    assert (await chain.authenticate(bearer(token()))).user_id == "u1"
    assert (await chain.authenticate(cookie("s"))).user_id == "from-session"
    assert (await chain.authenticate(req())).anonymous
    await refused(chain, bearer(token(key="x" * 32)))


async def test_chain_without_fallback_reports_missing(clock: FakeClock) -> None:
    """When no authenticator finds a credential the last MissingCredentialsError propagates."""
    chain = ChainAuthenticator(JWTAuthenticator(SECRET, clock=clock))
    with pytest.raises(MissingCredentialsError):
        await chain.authenticate(req())
    with pytest.raises(ConfigurationError):
        ChainAuthenticator()


# ---------------------------------------------------------------------------------------- origin
def origin(value: str | None) -> HandshakeRequest:
    return req(headers={} if value is None else {"Origin": value})


def test_origin_unchecked_when_no_list() -> None:
    """An empty allowed_origins accepts any Origin and none."""
    check_origin(origin(None), [])
    check_origin(origin("https://evil.test"), ())


@pytest.mark.parametrize(
    "value",
    [
        "https://app.example.com",
        "HTTPS://APP.Example.COM",
        "https://app.example.com:443",
        "http://localhost:3000",
        "https://a.example.org",
        "https://x.y.example.org",
    ],
)
def test_origin_allowed(value: str) -> None:
    """Exact, case-insensitive, default-port and wildcard-subdomain matches are accepted."""
    allowed = ["https://app.example.com/", "http://localhost:3000", "https://*.example.org"]
    check_origin(origin(value), allowed)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "https://evil.test",
        "http://app.example.com",
        "https://app.example.com:8443",
        "http://localhost:3001",
        "https://example.org",
        "https://evilexample.org",
        "https://example.org.evil.test",
        "null",
        "https://app.example.com/path",
        "https://user@app.example.com",
        "not an origin",
    ],
)
def test_origin_refused_with_403(value: str | None) -> None:
    """Missing, unlisted, other scheme/port, wildcard apex and look-alike origins get 403."""
    allowed = ["https://app.example.com", "http://localhost:3000", "https://*.example.org"]
    with pytest.raises(AuthenticationError) as info:
        check_origin(origin(value), allowed)
    assert info.value.status == 403


def test_repeated_origin_is_refused() -> None:
    """Two Origin headers are refused even if one is allowed."""
    request = req(headers=[("Origin", "https://a.test"), ("Origin", "https://evil.test")])
    with pytest.raises(AuthenticationError, match="repeated"):
        check_origin(request, ["https://a.test"])


@pytest.mark.parametrize(
    "entry",
    [
        "example.com",
        "*",
        "https://*",
        "https://a*.example.com",
        "https://e.com/app",
        "https://e.com:x",
    ],
)
def test_malformed_allowed_origins_are_configuration_errors(entry: str) -> None:
    """An allowed_origins entry that is not scheme://host[:port] fails validation and checks."""
    with pytest.raises(ConfigurationError, match="allowed_origins"):
        validate_allowed_origins(["https://ok.test", entry])
    with pytest.raises(ConfigurationError):
        check_origin(origin("https://ok.test"), [entry])
    validate_allowed_origins(["https://ok.test", "https://*.ok.test:8443"])
