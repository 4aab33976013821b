"""Handshake authentication for the WebSocket gateway: who is connecting, and from which origin.

Everything here works on a :class:`HandshakeRequest` that the server adapters (the ``websockets``
gateway and the ASGI adapter) fill from the HTTP upgrade request, and returns an
:class:`Identity` or raises :class:`~dotmac.communications.errors.AuthenticationError`. Nothing
here touches a connection: the adapters turn ``error.status`` into the HTTP response (401 or
403, no upgrade), a :class:`~dotmac.communications.errors.BackendUnavailableError` or
:class:`~dotmac.communications.errors.OperationTimeoutError` (session store down or slow) into
503, and close the connection :func:`token_expiry_delay` seconds after it opened.

**Token sources** (:class:`JWTAuthenticator`), tried in this order, the first present one used:

1. ``Authorization: Bearer <token>`` (other schemes are ignored);
2. the ``token`` query parameter (``wss://host/ws?token=<token>``); query strings end up in
   access logs, so disable it with ``query_param=None`` where that matters;
3. the ``Sec-WebSocket-Protocol`` header, for browsers, which cannot set headers on a WebSocket:
   the client offers the marker ``bearer`` immediately followed by the token as the next entry,
   ``new WebSocket(url, ["bearer", token])``. JWTs are made of base64url characters and dots,
   all legal in a subprotocol name. A browser fails the handshake unless the server selects one
   of the offered subprotocols, so :attr:`Identity.subprotocol` names the marker the server must
   echo (``"bearer"``); the token entry itself must never be selected.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeAlias, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers, HeadersLike

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import bounded_redis_call, create_redis_client
from dotmac.communications.errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    MissingCredentialsError,
)

if TYPE_CHECKING:
    import jwt
    import redis.asyncio as aioredis
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from dotmac.communications.config import WebSocketsSettings

__all__ = [
    "AnonymousAuthenticator",
    "Authenticator",
    "ChainAuthenticator",
    "HandshakeRequest",
    "Identity",
    "JWTAuthenticator",
    "SessionAuthenticator",
    "SessionResolver",
    "check_origin",
    "token_expiry_delay",
    "validate_allowed_origins",
]

_EXTRA = (
    "JWT authentication needs PyJWT with cryptography, a dependency of dotmac-communications: "
    "reinstall it (pip install 'pyjwt[crypto]')"
)
# Algorithms verified with the same kind of key. One authenticator accepts one family only: a
# list mixing HMAC with a public-key family invites algorithm confusion (a token MACed with the
# public key, which is no secret, passing as HS256).
_FAMILIES = {"HS": "HMAC", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_MAX_SESSION_ID = 1024
_COOKIE_DECODER = SimpleCookie()
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


# ------------------------------------------------------------------------------------- identity
@dataclass(frozen=True, slots=True, init=False)
class Identity:
    """Who is on the other end of a connection.

    Args:
        user_id: The user's id; ``None`` for an anonymous connection.
        tenant_id: The user's tenant, if any.
        roles: Role names, any iterable of strings (stored as a frozenset).
        expires_at: Unix seconds after which the credential is no longer accepted (a JWT's
            ``exp`` plus the authenticator's leeway, a session's ``expires_at``); ``None``: never.
        claims: Every claim of the token or field of the session record, read-only
            (shallow); not part of equality or the repr (it may hold personal data).
        subprotocol: The ``Sec-WebSocket-Protocol`` entry the server must select in its
            handshake response because the client offered its token there; ``None``: no
            obligation.

    Raises:
        ValueError: ``user_id`` or ``tenant_id`` is an empty string, or ``expires_at`` is not
            finite.
        TypeError: ``user_id`` or ``tenant_id`` is neither a string nor ``None`` (convert an
            integer id with ``str()``), or ``roles`` is a single string or holds something
            other than strings.
    """

    user_id: str | None
    tenant_id: str | None
    roles: frozenset[str]
    expires_at: float | None
    claims: Mapping[str, Any] = field(compare=False, repr=False)
    subprotocol: str | None

    def __init__(
        self,
        user_id: str | None = None,
        tenant_id: str | None = None,
        roles: Iterable[str] = frozenset(),
        expires_at: float | None = None,
        *,
        claims: Mapping[str, Any] | None = None,
        subprotocol: str | None = None,
    ) -> None:
        for name, value in (("user_id", user_id), ("tenant_id", tenant_id)):
            # An integer id would name a channel "user:5" that send_to_user("5") never reaches.
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"Identity: {name} must be a string or None, got {type(value).__name__} "
                    f"{value!r} (convert it with str())"
                )
        if user_id == "" or tenant_id == "":
            raise ValueError("user_id and tenant_id must be None or non-empty strings")
        if expires_at is not None and not math.isfinite(expires_at):
            raise ValueError(f"expires_at must be finite, got {expires_at!r}")
        if isinstance(roles, str):
            raise TypeError("roles must be an iterable of role names, not a single string")
        frozen_roles = frozenset(roles)
        if not all(isinstance(role, str) for role in frozen_roles):
            raise TypeError(f"roles must be strings, got {sorted(map(repr, frozen_roles))}")
        object.__setattr__(self, "user_id", user_id)
        object.__setattr__(self, "tenant_id", tenant_id)
        object.__setattr__(self, "roles", frozen_roles)
        object.__setattr__(self, "expires_at", None if expires_at is None else float(expires_at))
        object.__setattr__(self, "claims", MappingProxyType(dict(claims or {})))
        object.__setattr__(self, "subprotocol", subprotocol)

    @property
    def anonymous(self) -> bool:
        """``True`` when no user is authenticated (``user_id is None``)."""
        return self.user_id is None


def token_expiry_delay(identity: Identity, now: float) -> float | None:
    """Seconds until a connection opened with ``identity`` must be closed.

    Args:
        identity: The identity the handshake produced.
        now: Current wall-clock time, unix seconds (``clock.time()``).

    Returns:
        ``None`` when the identity never expires, else the seconds left, never negative
        (``0.0``: close now).
    """
    if identity.expires_at is None:
        return None
    return max(0.0, identity.expires_at - now)


# ------------------------------------------------------------------------------------- request
@dataclass(frozen=True, slots=True, init=False)
class HandshakeRequest:
    """The parts of a WebSocket upgrade request that authentication looks at.

    Args:
        path: The URL path, without the query string.
        headers: Request headers: :class:`websockets.datastructures.Headers`, a mapping or
            ``(name, value)`` pairs. Copied into a case-insensitive
            :class:`~websockets.datastructures.Headers` that keeps repeated headers.
        query: Query parameters, one value per name.
        remote_address: The peer's address as the server reports it (``(host, port)``), or
            ``None`` when unknown.

    ``cookies`` is derived from the ``Cookie`` header(s): each ``name=value`` pair is read on
    its own, so one malformed cookie (set by another application on the same domain) never
    hides the others; values are unquoted as :class:`http.cookies.SimpleCookie` does; the first
    of repeated names wins (browsers send the most specific path first).
    """

    path: str
    headers: Headers
    query: Mapping[str, str]
    remote_address: tuple[Any, ...] | None
    cookies: Mapping[str, str] = field(repr=False)

    def __init__(
        self,
        path: str,
        headers: HeadersLike,
        query: Mapping[str, str] | None = None,
        remote_address: tuple[Any, ...] | None = None,
    ) -> None:
        copied = Headers(headers)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "headers", copied)
        object.__setattr__(self, "query", MappingProxyType(dict(query or {})))
        object.__setattr__(self, "remote_address", remote_address)
        object.__setattr__(self, "cookies", _parse_cookies(copied.get_all("Cookie")))

    @classmethod
    def from_path_and_headers(
        cls,
        path: str,
        headers: HeadersLike,
        remote_address: tuple[Any, ...] | None = None,
    ) -> HandshakeRequest:
        """Build a request from a request target with its query string (``/ws?token=...``).

        Args:
            path: The request target as received, for example ``websockets``'
                ``Request.path``. Percent-escapes in the query are decoded; the first of
                repeated parameters wins.
            headers: Request headers, as for the constructor.
            remote_address: The peer's address, if known.

        Returns:
            The request with ``path`` stripped of its query string.
        """
        bare, _, query_string = path.partition("?")
        query: dict[str, str] = {}
        for name, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(name, value)
        return cls(bare, headers, query, remote_address)

    @property
    def offered_subprotocols(self) -> list[str]:
        """Entries of every ``Sec-WebSocket-Protocol`` header, in order, blanks dropped."""
        return [
            entry.strip()
            for value in self.headers.get_all("Sec-WebSocket-Protocol")
            for entry in value.split(",")
            if entry.strip()
        ]


def _parse_cookies(values: Sequence[str]) -> Mapping[str, str]:
    cookies: dict[str, str] = {}
    for value in values:
        for pair in value.split(";"):
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if not sep or not name:
                continue
            decoded, _ = _COOKIE_DECODER.value_decode(raw.strip())
            cookies.setdefault(name, decoded)
    return MappingProxyType(cookies)


# -------------------------------------------------------------------------------- authenticators
@runtime_checkable
class Authenticator(Protocol):
    """Turns a handshake into an :class:`Identity`, or refuses it."""

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Authenticate ``request``.

        Raises:
            MissingCredentialsError: The request carries no credential this authenticator reads.
            AuthenticationError: The credential is invalid (``status`` 401).
        """
        ...


class AnonymousAuthenticator:
    """Accept every connection as anonymous; put it last in a :class:`ChainAuthenticator`."""

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return an anonymous :class:`Identity`."""
        return Identity()


class ChainAuthenticator:
    """Try authenticators in order until one finds a credential.

    Only :class:`~dotmac.communications.errors.MissingCredentialsError` moves on to the next
    authenticator; a credential that is present but invalid refuses the handshake, so a bad
    token is never downgraded to, say, an anonymous connection.

    Args:
        *authenticators: At least one authenticator.

    Raises:
        ConfigurationError: No authenticator was given.
    """

    def __init__(self, *authenticators: Authenticator) -> None:
        if not authenticators:
            raise ConfigurationError("ChainAuthenticator needs at least one authenticator")
        self.authenticators = authenticators

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return the first identity found.

        Raises:
            MissingCredentialsError: No authenticator found a credential (the last one's error).
            AuthenticationError: An authenticator refused a credential.
        """
        *first, last = self.authenticators
        for authenticator in first:
            try:
                return await authenticator.authenticate(request)
            except MissingCredentialsError:
                continue
        return await last.authenticate(request)


class JWTAuthenticator:
    """Authenticate with a JWT verified by PyJWT.

    Claims: ``sub`` → :attr:`Identity.user_id` (required, a non-empty string),
    ``tenant_claim`` → ``tenant_id`` (a string or integer, optional), ``roles_claim`` →
    ``roles`` (a list of strings or one space-separated string, optional), ``exp`` →
    ``expires_at`` (plus ``leeway``). ``exp``, ``nbf`` and ``iat`` are checked against
    ``clock`` with ``leeway``; ``aud`` and ``iss`` are checked when ``audience`` / ``issuer`` are
    given, and a token carrying ``aud`` is refused when no ``audience`` is configured (RFC 7519
    §4.1.3). See the module docstring for where the token is read from.

    Args:
        secret_or_key: For ``HS*`` the shared secret (at least as long as the hash: 32 bytes
            for HS256); for ``RS*``/``PS*``/``ES*``/``EdDSA`` the PUBLIC key, as PEM (or
            ``ssh-...``) text or a ``cryptography`` public-key object. A private key is refused:
            a verifier never needs it, and holding it here would let a leak forge tokens.
        algorithms: Accepted ``alg`` values, all from one family (HMAC, RSA, EC or OKP);
            ``none`` is never accepted.
        audience: Required ``aud`` (one of several when a sequence).
        issuer: Required ``iss`` (one of several when a sequence).
        leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        require_exp: Refuse tokens without ``exp`` (they would never expire).
        tenant_claim: Claim holding the tenant id.
        roles_claim: Claim holding the roles.
        query_param: Query parameter carrying a token; ``None`` disables that source.
        subprotocol: Subprotocol marker preceding a token in ``Sec-WebSocket-Protocol``;
            ``None`` disables that source.
        clock: Time source for the expiry checks.

    Raises:
        ConfigurationError: No or an unusable key (wrong type for the algorithms, a private
            key, an HMAC secret shorter than the hash, an RSA key under 2048 bits), no
            algorithms, ``none``, an unknown algorithm, mixed families, a negative leeway, or
            an empty ``query_param`` / ``subprotocol`` (``None`` disables a source).
        ImportError: PyJWT or cryptography is missing.
    """

    def __init__(
        self,
        secret_or_key: str | bytes | PublicKeyTypes,
        *,
        algorithms: Sequence[str] = ("HS256",),
        audience: str | Sequence[str] | None = None,
        issuer: str | Sequence[str] | None = None,
        leeway: float = 30.0,
        require_exp: bool = True,
        tenant_claim: str = "tenant_id",
        roles_claim: str = "roles",
        query_param: str | None = "token",
        subprotocol: str | None = "bearer",
        clock: Clock = system_clock,
    ) -> None:
        try:
            import jwt  # noqa: PLC0415 -- optional dependency, fail at construction
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(_EXTRA) from exc
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        if not algorithms:
            raise ConfigurationError("JWTAuthenticator: algorithms must not be empty")
        if any(alg.lower() == "none" for alg in algorithms):
            raise ConfigurationError("JWTAuthenticator: the 'none' algorithm is never accepted")
        families = {_FAMILIES.get(alg[:2]) for alg in algorithms}
        if None in families or len(families) > 1:
            raise ConfigurationError(
                f"JWTAuthenticator: algorithms {list(algorithms)!r} must be known and from one "
                "family (HS*, RS*/PS*, ES* or EdDSA)"
            )
        if not math.isfinite(leeway) or leeway < 0:
            raise ConfigurationError(f"JWTAuthenticator: leeway must be >= 0, got {leeway!r}")
        if isinstance(secret_or_key, str | bytes) and not secret_or_key:
            raise ConfigurationError("JWTAuthenticator: the secret or key is empty")
        for name, source in (("query_param", query_param), ("subprotocol", subprotocol)):
            if source == "":
                raise ConfigurationError(
                    f"JWTAuthenticator: {name} is empty; pass {name}=None to disable that source"
                )
        self._key = _prepare_key(jwt, secret_or_key, algorithms)
        self._jwt = jwt.PyJWT(
            {
                # exp/nbf/iat are checked against the injected clock in _time_claims.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["sub", "exp"] if require_exp else ["sub"],
                "enforce_minimum_key_length": True,
            }
        )
        self._pyjwt_error: type[jwt.PyJWTError] = jwt.PyJWTError
        self.algorithms = tuple(algorithms)
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        self.tenant_claim = tenant_claim
        self.roles_claim = roles_claim
        self.query_param = query_param
        self.subprotocol = subprotocol
        self._clock = clock

    @classmethod
    def from_config(cls, settings: WebSocketsSettings, *, clock: Clock = system_clock) -> Self:
        """Build the authenticator from ``websockets`` settings.

        Uses ``jwt_secret`` (a secret, or a PEM public key for the asymmetric algorithms),
        ``jwt_algorithms``, ``jwt_audience``, ``jwt_issuer`` and ``jwt_leeway`` (as the gateway
        does); everything else keeps its default.

        Args:
            settings: The ``websockets`` section of the configuration.
            clock: Time source for the expiry checks.

        Raises:
            ConfigurationError: ``jwt_secret`` is unset, or unusable as for the constructor.
        """
        if settings.jwt_secret is None:
            raise ConfigurationError(
                "websockets.jwt_secret: required for JWT authentication "
                "(DOTMAC_WEBSOCKETS__JWT_SECRET)"
            )
        return cls(
            settings.jwt_secret.get_secret_value(),
            algorithms=settings.jwt_algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway,
            clock=clock,
        )

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Verify the request's token and return its identity.

        Raises:
            MissingCredentialsError: No token in any enabled source.
            AuthenticationError: The token is malformed, badly signed, expired, not yet valid,
                for another audience or issuer, uses a refused algorithm, or its ``sub``,
                tenant or roles claim is missing or of the wrong type.
        """
        token, subprotocol = self._find_token(request)
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                self._key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
            )
        except self._pyjwt_error as exc:
            raise AuthenticationError(f"JWT refused: {exc}") from exc
        expires_at = self._time_claims(claims)
        subject = claims["sub"]
        if not subject:  # PyJWT checked it is a string; "" would name no one
            raise AuthenticationError("JWT refused: the sub claim is empty")
        return Identity(
            user_id=subject,
            tenant_id=_id_value(claims.get(self.tenant_claim), f"JWT claim {self.tenant_claim!r}"),
            roles=_roles(claims.get(self.roles_claim), f"JWT claim {self.roles_claim!r}"),
            expires_at=expires_at,
            claims=claims,
            subprotocol=subprotocol,
        )

    def _find_token(self, request: HandshakeRequest) -> tuple[str, str | None]:
        """Return the token and the subprotocol marker to echo (if the client offered one)."""
        subprotocol, offered = self._subprotocol_token(request)
        authorizations = request.headers.get_all("Authorization")
        if len(authorizations) > 1:
            raise AuthenticationError("JWT refused: more than one Authorization header")
        if authorizations:
            scheme, _, credentials = authorizations[0].strip().partition(" ")
            if scheme.lower() == "bearer":
                token = credentials.strip()
                if not token or " " in token:
                    raise AuthenticationError("JWT refused: malformed Authorization header")
                return token, subprotocol
        if self.query_param is not None and self.query_param in request.query:
            token = request.query[self.query_param]
            if not token:
                raise AuthenticationError(f"JWT refused: the {self.query_param!r} query is empty")
            return token, subprotocol
        if offered is not None:
            return offered, subprotocol
        raise MissingCredentialsError("no JWT in the Authorization header, query or subprotocol")

    def _subprotocol_token(self, request: HandshakeRequest) -> tuple[str | None, str | None]:
        if self.subprotocol is None:
            return None, None
        entries = request.offered_subprotocols
        try:
            index = entries.index(self.subprotocol)
        except ValueError:
            return None, None
        if index + 1 >= len(entries):
            raise AuthenticationError(
                f"JWT refused: subprotocol {self.subprotocol!r} is not followed by a token"
            )
        return self.subprotocol, entries[index + 1]

    def _time_claims(self, claims: Mapping[str, Any]) -> float | None:
        now = self._clock.time()
        exp = _numeric_date(claims, "exp")
        if exp is not None and now >= exp + self.leeway:
            raise AuthenticationError("JWT refused: the token has expired")
        for name in ("nbf", "iat"):
            moment = _numeric_date(claims, name)
            if moment is not None and moment > now + self.leeway:
                raise AuthenticationError(f"JWT refused: the token is not yet valid ({name})")
        return None if exp is None else exp + self.leeway


def _prepare_key(jwt: Any, key: Any, algorithms: Sequence[str]) -> Any:
    """Parse the key once for every algorithm; refuse what could not verify or should not."""
    prepared: Any = None
    for alg in algorithms:
        algorithm = jwt.get_algorithm_by_name(alg)
        try:
            prepared = algorithm.prepare_key(key)
        except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"JWTAuthenticator: the key is not usable for {alg}: {exc}"
            ) from None
        if hasattr(prepared, "private_bytes"):
            raise ConfigurationError(
                "JWTAuthenticator: pass the PUBLIC key; a verifier never needs the private key"
            )
        weakness = algorithm.check_key_length(prepared)
        if weakness:
            raise ConfigurationError(f"JWTAuthenticator: {weakness}")
    return prepared


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationError(f"JWT refused: the {name} claim is not a number")
    return float(value)


def _id_value(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise AuthenticationError(f"{what} must be a non-empty string or an integer")


def _roles(value: Any, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple) and all(isinstance(role, str) for role in value):
        return frozenset(value)
    raise AuthenticationError(f"{what} must be a list of strings or a space-separated string")


# -------------------------------------------------------------------------------------- sessions
SessionResolver: TypeAlias = Callable[[str], Awaitable[Mapping[str, Any] | Identity | None]]
"""``async (session_id) -> record | Identity | None``: ``None`` for an unknown session."""


class SessionAuthenticator:
    """Authenticate with a session cookie, resolved by the host or read from Redis.

    The session record, whether returned by ``resolve`` or stored in Redis as JSON under
    ``{key_prefix}{session_id}``, is an object with these fields (others are kept in
    :attr:`Identity.claims`)::

        {"user_id": "u1",            # required: non-empty string (or integer)
         "tenant_id": "t1",          # optional: string, integer or null
         "roles": ["admin", "ops"],  # optional: list of strings or "admin ops"
         "expires_at": 1700003600}   # optional: unix seconds or null (never)

    ``resolve`` may also return a ready :class:`Identity`. An unknown session (``None``, no
    Redis key) or one past ``expires_at`` is refused with 401. Redis being unreachable raises
    :class:`~dotmac.communications.errors.BackendUnavailableError` (the gateway answers 503);
    exceptions raised by ``resolve`` propagate unchanged. Cookie-authenticated WebSockets are
    exactly what cross-site WebSocket hijacking abuses: set ``allowed_origins`` with this.

    Args:
        resolve: Host callable resolving a session id; exclusive with the Redis store.
        cookie_name: Name of the session cookie.
        redis_url: Redis holding the sessions; the client is created here and closed by
            :meth:`aclose`.
        redis_client: A ready asyncio Redis client instead (not closed by :meth:`aclose`).
        key_prefix: Prefix of the Redis session keys.
        timeout: Seconds allowed for one Redis lookup.
        clock: Time source for ``expires_at``.

    Raises:
        ConfigurationError: Not exactly one of ``resolve``, ``redis_url``, ``redis_client``;
            a cookie name no cookie can have (empty, or with ``=``, ``;`` or surrounding
            whitespace); a timeout that is not a finite number > 0; a bad Redis URL.
    """

    def __init__(
        self,
        resolve: SessionResolver | None = None,
        *,
        cookie_name: str = "session",
        redis_url: str | None = None,
        redis_client: aioredis.Redis | None = None,
        key_prefix: str = "session:",
        timeout: float = 2.0,
        clock: Clock = system_clock,
    ) -> None:
        sources = {"resolve": resolve, "redis_url": redis_url, "redis_client": redis_client}
        given = [name for name, source in sources.items() if source is not None]
        if len(given) != 1:
            raise ConfigurationError(
                "SessionAuthenticator: give exactly one of resolve, redis_url, redis_client; "
                f"got {' and '.join(given) or 'none'}"
            )
        if (
            not cookie_name
            or cookie_name != cookie_name.strip()
            or any(char in cookie_name for char in "=;")
        ):
            raise ConfigurationError(
                f"SessionAuthenticator: cookie_name {cookie_name!r} can never match a cookie: "
                "it must be non-empty, without '=', ';' or surrounding whitespace"
            )
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigurationError(
                f"SessionAuthenticator: timeout must be a finite number > 0, got {timeout!r}"
            )
        self._owns_client = redis_url is not None
        self._store: _RedisSessionStore | None = None
        if redis_client is not None:
            self._store = _RedisSessionStore(redis_client, key_prefix, timeout)
        elif redis_url is not None:
            self._store = _RedisSessionStore(create_redis_client(redis_url), key_prefix, timeout)
        self._resolve: SessionResolver
        if resolve is not None:
            self._resolve = resolve
        elif self._store is not None:
            self._resolve = self._store
        self.cookie_name = cookie_name
        self.key_prefix = key_prefix
        self.timeout = timeout
        self._clock = clock

    @classmethod
    def from_config(
        cls,
        settings: WebSocketsSettings,
        resolve: SessionResolver | None = None,
        *,
        clock: Clock = system_clock,
    ) -> Self:
        """Build the authenticator from ``websockets`` settings.

        Reads the session cookie named ``session_cookie``. Sessions are resolved by ``resolve``
        when given, else read from the Redis store at ``redis_url`` under ``session_prefix``
        (the gateway does not build one by itself: it cannot guess where sessions live). A
        ``redis_url`` next to a ``resolve`` is left alone: it may serve other purposes.
        Everything else keeps its default; close a Redis-backed authenticator with
        :meth:`aclose`.

        Args:
            settings: The ``websockets`` section of the configuration.
            resolve: Host callable resolving a session id.
            clock: Time source for ``expires_at``.

        Raises:
            ConfigurationError: No ``resolve`` and no ``redis_url``, or a setting unusable as
                for the constructor.
        """
        if resolve is not None:
            return cls(resolve, cookie_name=settings.session_cookie, clock=clock)
        if settings.redis_url is None:
            raise ConfigurationError(
                "websockets.redis_url: required for session authentication without a resolve "
                "callable (DOTMAC_WEBSOCKETS__REDIS_URL or DOTMAC_REDIS_URL); or pass "
                "SessionAuthenticator.from_config(settings, resolve)"
            )
        return cls(
            cookie_name=settings.session_cookie,
            redis_url=settings.redis_url,
            key_prefix=settings.session_prefix,
            clock=clock,
        )

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Resolve the session cookie into an identity.

        Raises:
            MissingCredentialsError: No (or an empty) session cookie.
            AuthenticationError: The session is unknown, expired, or its id is too long.
            BackendUnavailableError: Redis cannot be reached.
            OperationTimeoutError: The Redis lookup took longer than ``timeout``.
            BackendError: The session record is malformed.
        """
        session_id = request.cookies.get(self.cookie_name)
        if not session_id:
            raise MissingCredentialsError(f"no {self.cookie_name!r} session cookie")
        if len(session_id) > _MAX_SESSION_ID:
            raise AuthenticationError(f"session refused: the {self.cookie_name!r} id is too long")
        found = await self._lookup(session_id)
        if found is None:
            raise AuthenticationError("session refused: unknown or expired session")
        identity = found if isinstance(found, Identity) else _session_identity(found)
        if identity.anonymous:
            raise BackendError("session store returned an identity without a user", transient=False)
        if identity.expires_at is not None and self._clock.time() >= identity.expires_at:
            raise AuthenticationError("session refused: the session has expired")
        return identity

    async def _lookup(self, session_id: str) -> Mapping[str, Any] | Identity | None:
        found = await self._resolve(session_id)
        if found is not None and not isinstance(found, Mapping | Identity):
            raise BackendError(
                f"session resolver returned a {type(found).__name__}, "
                "not a mapping, an Identity or None",
                transient=False,
            )
        return found

    async def aclose(self) -> None:
        """Close the Redis client created from ``redis_url`` (an injected one stays open)."""
        if self._owns_client and self._store is not None:
            await self._store.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _RedisSessionStore:
    """The Redis session store as a resolver: ``GET {prefix}{session_id}``, a JSON object."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, timeout: float) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.timeout = timeout

    async def __call__(self, session_id: str) -> Mapping[str, Any] | None:
        async with bounded_redis_call("session lookup", self.timeout):
            raw = await self.client.get(f"{self.key_prefix}{session_id}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise BackendError(
                "session store holds a record that is not JSON", transient=False
            ) from exc
        if not isinstance(record, dict):
            raise BackendError(
                "session store holds a record that is not a JSON object", transient=False
            )
        return record


def _session_identity(record: Mapping[str, Any]) -> Identity:
    try:
        user_id = _id_value(record.get("user_id"), "session field 'user_id'")
        tenant_id = _id_value(record.get("tenant_id"), "session field 'tenant_id'")
        roles = _roles(record.get("roles"), "session field 'roles'")
        expires_at = _numeric_date(record, "expires_at")
    except AuthenticationError as exc:
        raise BackendError(f"malformed session record: {exc}", transient=False) from None
    if user_id is None:
        raise BackendError("malformed session record: no user_id", transient=False)
    return Identity(user_id, tenant_id, roles, expires_at, claims=record)


# ---------------------------------------------------------------------------------------- origin
@dataclass(frozen=True, slots=True)
class _OriginPattern:
    scheme: str
    host: str  # without the "*." of a wildcard
    port: int | None
    wildcard: bool

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def validate_allowed_origins(allowed_origins: Sequence[str]) -> None:
    """Check ``allowed_origins`` entries, so a typo fails at start-up rather than per handshake.

    Each entry is ``scheme://host[:port]``, optionally with ``*.`` as the whole first label of
    the host (``https://*.example.com``: any subdomain at any depth, not ``example.com``
    itself). Scheme and host compare case-insensitively; the default port of the scheme may be
    written or omitted; a trailing ``/`` is tolerated; no other path, query or credentials.

    Raises:
        ConfigurationError: An entry does not have that shape (naming it).
    """
    _compile_origins(tuple(allowed_origins))


def check_origin(request: HandshakeRequest, allowed_origins: Sequence[str]) -> None:
    """Refuse a handshake from an origin not in ``allowed_origins`` (CORS for WebSockets).

    Browsers always send ``Origin`` on a WebSocket handshake and let any page open one, with
    the user's cookies: checking it is what stops cross-site WebSocket hijacking. With an empty
    list every origin (and no ``Origin``) is accepted. See :func:`validate_allowed_origins`
    for the entry syntax; ``null`` (sandboxed frames, ``file://``) never matches.

    Args:
        request: The handshake.
        allowed_origins: Accepted origins; empty: no check.

    Raises:
        AuthenticationError: ``status`` 403: the list is non-empty and ``Origin`` is missing,
            repeated, malformed or not listed.
        ConfigurationError: An entry of ``allowed_origins`` is malformed.
    """
    if not allowed_origins:
        return
    patterns = _compile_origins(tuple(allowed_origins))
    origins = request.headers.get_all("Origin")
    if len(origins) != 1:
        raise AuthenticationError("origin refused: missing or repeated Origin header", status=403)
    parsed = _parse_origin(origins[0].strip())
    if parsed is not None and any(pattern.matches(*parsed) for pattern in patterns):
        return
    raise AuthenticationError(f"origin refused: {origins[0][:200]!r} is not allowed", status=403)


@functools.lru_cache(maxsize=16)
def _compile_origins(allowed_origins: tuple[str, ...]) -> tuple[_OriginPattern, ...]:
    patterns = []
    for entry in allowed_origins:
        wildcard = "://*." in entry
        parsed = _parse_origin(entry.replace("://*.", "://", 1) if wildcard else entry)
        if parsed is None:
            raise ConfigurationError(
                f"websockets.allowed_origins: {entry!r} is not scheme://host[:port] "
                "(with an optional '*.' first label)"
            )
        patterns.append(_OriginPattern(parsed[0], parsed[1], parsed[2], wildcard))
    return tuple(patterns)


def _parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """Split an origin into (scheme, host, port-or-None-for-default); None when malformed."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if (
        not parts.scheme
        or not host
        or "*" in host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    scheme = parts.scheme.lower()
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, host.lower().rstrip("."), port
