"""A real OAuth 2.0 token endpoint for tests: Authlib's ``AuthorizationServer``.

The peer the refresh code talks to in tests is Authlib's Flask
``AuthorizationServer`` with a ``RefreshTokenGrant``, served by werkzeug on
``127.0.0.1:<random port>`` in a background thread. Nothing about the HTTP
exchange is mocked: client authentication, the grant, the error bodies and
status codes are Authlib's own. On top of it the server can *script* faults
(5xx, 429 + ``Retry-After``, garbage bodies, hangs) that are answered before
Authlib sees the request, and it records every request it receives.

Usage (the server lives in its own threads, so sync and async tests alike can
use it; starting/stopping costs ~50 ms, so prefer a module-scoped fixture and
``reset()`` between tests)::

    @pytest.fixture(scope="module")
    def oauth_server():
        with OAuthServer() as server:
            yield server

    @pytest.fixture
    def oauth(oauth_server):
        oauth_server.reset()
        return oauth_server

    def test_x(oauth):
        oauth.add_client("cid", "secret", rotate_refresh_token=True)
        rt = oauth.issue_refresh_token("cid")
        oauth.script(Fault(status=500))      # first request: 500, then real handling
        ...                                  # POST to oauth.token_url
        assert oauth.requests[-1].status == 200

API
---
``OAuthServer()``, ``start()``/``stop()`` (or ``with``), ``url``, ``token_url``,
``add_client(...)``, ``issue_refresh_token(...)``, ``revoke(...)``,
``is_active(...)``, ``script(*faults)``, ``requests``, ``reset()``,
``echo_credentials``, ``authorize_url``, ``app`` (the Flask app, for WSGI
middleware). ``OAuthServer(tls=True)`` serves HTTPS with a fresh self-signed
certificate that no client trusts (a TLS failure).
``Fault`` and ``Hang`` are the scriptable faults; ``RecordedRequest`` is what
``requests`` holds.

Per-client behaviour (``add_client``):

* ``rotate_refresh_token=True`` (Microsoft-like): every refresh returns a new
  refresh token and revokes the one used; reusing it gives 400 ``invalid_grant``.
* ``return_refresh_token=False`` (Dropbox-/Google-like): the response has no
  ``refresh_token``; the old one stays valid. With ``return_refresh_token=True``
  and no rotation the *same* refresh token is echoed back.
* ``auth_methods``: the client authentication methods this client may use,
  out of ``client_secret_basic`` and ``client_secret_post``. The grant accepts
  both (``TOKEN_ENDPOINT_AUTH_METHODS``; Authlib's default is Basic only) and
  the client model restricts them (``check_endpoint_auth_method``). A client
  using a method it is not allowed, a wrong secret or an unknown client id gets
  401 ``invalid_client`` with a ``WWW-Authenticate`` header (Authlib answers
  401, not 400, whenever Basic is among the grant's methods) -- except an
  unknown ``client_id`` sent as a form field (``client_secret_post``), which
  Authlib answers with 400 ``invalid_client``.
* ``expires_in=None``: the response has no ``expires_in`` (0 too).
* ``scope``: default scope of seeded refresh tokens; returned as ``scope``.
* ``answer_format="form"`` (GitHub-like): every answer of the token endpoint for
  this client, tokens and errors alike, is ``application/x-www-form-urlencoded``
  (``access_token=...&expires_in=3600&...``) instead of JSON, whatever the
  client's ``Accept``.
* ``errors_with_200=True`` (GitHub-like): an OAuth error is answered with HTTP
  200 and the error in the body (``error=bad_refresh_token&...``).

The client of a request is the one Authlib authenticated, else the one named
by the request (Basic user id or ``client_id`` field), so these options also
shape the ``invalid_client`` answer to a wrong secret.

``echo_credentials = True`` makes every error answer echo what the request
carried in its ``error_description``: the refresh token, the client id and
secret (as sent and percent-decoded) and the raw ``Authorization`` header, the
way careless providers do; ``reset()`` turns it off.

``authorize_url`` is a GET-only page (the authorization endpoint): a POST there
gets Flask's 405, as with a provider whose ``tokenUrl`` holds its ``authUrl``.
Any other path gets 404.

Errors: an unknown, revoked, rotated-away or other-client refresh token gives
400 ``{"error": "invalid_grant"}``; a body that is not form-urlencoded (e.g.
JSON) gives 400 ``unsupported_grant_type`` because Authlib reads form fields.

Basic credentials and ``%``, ``+``, ``/`` (RFC 6749 §2.3.1)
-----------------------------------------------------------
RFC 6749 §2.3.1 says the client id and secret are encoded with the
``application/x-www-form-urlencoded`` algorithm *before* they are joined with
``:`` and base64-encoded for HTTP Basic. Authlib 1.9
(``authlib.oauth2.rfc6749.util.extract_basic_authorization``) decodes them
with ``urllib.parse.unquote`` -- *not* ``unquote_plus``. What the server
therefore accepts, as verified by ``tests/test_oauth_server.py``:

* **Percent-encoding everything** (``quote(secret, safe="")``) is always
  accepted, whatever the secret contains. This is the encoding a client should
  send: it is also what a strict form-decoding server expects.
* **The raw secret** is accepted *unless it contains ``%`` followed by two hex
  digits*: ``unquote`` leaves ``+``, ``/`` and a ``%`` that does not start a
  valid escape untouched. So raw ``s3c%r+e/t%`` is accepted, but raw
  ``s3c%2Fr+e/t`` is decoded to ``s3c/r+e/t`` and rejected with 401
  ``invalid_client``. (A strict RFC server would additionally turn a raw ``+``
  into a space and reject it; Authlib does not.)
* **``quote_plus``** (spaces as ``+``, the literal form-urlencoding) works for
  ``%``, ``+`` and ``/`` but breaks a secret containing a space: Authlib does
  not turn ``+`` back into a space, so ``a b`` arrives as ``a+b`` -> 401.

``client_secret_post`` has none of these issues: the secret is a form field and
is decoded by the form parser. ``RecordedRequest.basic_auth`` holds the Basic
credentials exactly as sent (base64-decoded, not percent-decoded), so a test
can assert which encoding a client used.

Faults
------
``script(*items)`` queues items consumed, one per request, by requests to the
token endpoint, in order; when the queue is empty Authlib handles the request.
``Fault(status, body, headers)`` answers immediately (a ``dict`` body is sent
as JSON, ``str``/``bytes`` as text unless ``headers`` set ``Content-Type``).
``Hang(seconds, then=None)`` sleeps in the handler thread and then answers
with ``then`` (a ``Fault``) or, if ``then`` is None, lets Authlib handle the
request -- so a client that timed out may find its refresh token already
rotated, as with a real lost response. ``stop()`` and ``reset()`` wake every
sleeping handler at once; a woken handler answers 503 without touching any
token, so neither call waits for a hang to finish.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote, urlencode

from authlib.common.security import generate_token
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.grants import RefreshTokenGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from flask import Flask, Response, g, request
from werkzeug.datastructures import Headers
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = ["Fault", "Hang", "OAuthServer", "RecordedRequest"]

AUTH_METHODS = ("client_secret_basic", "client_secret_post")
TOKEN_PATH = "/oauth/token"
AUTHORIZE_PATH = "/oauth/authorize"


@dataclass(frozen=True)
class Fault:
    """A canned response sent instead of Authlib's."""

    status: int
    body: str | bytes | Mapping[str, Any] = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_response(self) -> Response:
        headers = Headers(dict(self.headers))
        if isinstance(self.body, Mapping):
            data: str | bytes = json.dumps(dict(self.body))
            headers.setdefault("Content-Type", "application/json")
        else:
            data = self.body
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return Response(data, status=self.status, headers=headers)


@dataclass(frozen=True)
class Hang:
    """Sleep ``seconds`` in the handler, then answer ``then`` (or real handling)."""

    seconds: float
    then: Fault | None = None


ScriptItem = Fault | Hang

#: Answer of a hanging handler woken by ``stop()``/``reset()``.
_WOKEN = Fault(503, {"error": "temporarily_unavailable",
                     "error_description": "test server stopped or reset"})


@dataclass
class RecordedRequest:
    """One request received by the server (any path)."""

    method: str
    path: str
    #: case-insensitive (``headers["user-agent"]`` works)
    headers: Headers
    #: form fields of a form-urlencoded body (empty otherwise)
    form: dict[str, str]
    body: bytes
    #: ``time.time()`` and ``time.monotonic()`` when the request arrived
    time: float
    monotonic: float
    #: Basic credentials as sent: base64-decoded but NOT percent-decoded
    basic_auth: tuple[str, str] | None = None
    #: set once Authlib authenticated a client
    client_id: str | None = None
    auth_method: str | None = None
    #: the scripted item that answered, if any
    scripted: ScriptItem | None = None
    #: filled in before the response is sent
    status: int | None = None
    response_text: str | None = None

    @property
    def response_json(self) -> Any:
        """The response body parsed as JSON, or None if it is not JSON."""
        if self.response_text is None:
            return None
        try:
            return json.loads(self.response_text)
        except ValueError:
            return None


@dataclass
class _Client(ClientMixin):
    client_id: str
    client_secret: str
    auth_methods: tuple[str, ...]
    rotate_refresh_token: bool
    return_refresh_token: bool
    expires_in: int | None
    scope: str
    answer_format: str = "json"
    errors_with_200: bool = False

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in self.auth_methods

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "refresh_token"


@dataclass
class _Token(TokenMixin):
    refresh_token: str
    client_id: str
    scope: str
    revoked: bool = False

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return 0

    def is_expired(self) -> bool:
        return False

    def is_revoked(self) -> bool:
        return self.revoked


class _User:
    id = "test-user"


_USER = _User()


class _AuthorizationServer(AuthorizationServer):
    owner: OAuthServer


class _RefreshTokenGrant(RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = list(AUTH_METHODS)
    server: _AuthorizationServer

    def authenticate_token_endpoint_client(self) -> _Client:
        client: _Client = super().authenticate_token_endpoint_client()
        record: RecordedRequest | None = g.get("record")
        if record is not None:
            record.client_id = client.client_id
            record.auth_method = getattr(self.request, "auth_method", None)
        return client

    def authenticate_refresh_token(self, refresh_token: str) -> _Token | None:
        token = self.server.owner._tokens.get(refresh_token)
        if token is None or token.revoked:
            return None
        return token

    def authenticate_user(self, refresh_token: _Token) -> _User:
        return _USER

    def issue_token(self, user: _User, refresh_token: _Token) -> dict[str, Any]:
        client: _Client = self.request.client
        # per client, not per class: instance attribute shadows the class default
        self.INCLUDE_NEW_REFRESH_TOKEN = client.rotate_refresh_token
        token: dict[str, Any] = super().issue_token(user, refresh_token)
        if client.return_refresh_token and not client.rotate_refresh_token:
            token["refresh_token"] = refresh_token.refresh_token
        return token

    def revoke_old_credential(self, refresh_token: _Token) -> None:
        if self.request.client.rotate_refresh_token:
            refresh_token.revoked = True


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class OAuthServer:
    """Authlib token endpoint with refresh-token grant, faults and request log."""

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        #: error answers echo the request's credentials in error_description
        self.echo_credentials = False
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._tokens: dict[str, _Token] = {}
        self._script: deque[ScriptItem] = deque()
        self._wake = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        #: every request received, in arrival order
        self.requests: list[RecordedRequest] = []
        self._app = self._make_app()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            return
        self._wake = threading.Event()
        server = make_server("127.0.0.1", 0, self._app, threaded=True,
                             request_handler=_QuietHandler,
                             ssl_context=_self_signed_context() if self.tls else None)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"oauth-server-{server.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._wake.set()  # cut hanging handlers short
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> OAuthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("OAuthServer is not started")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}{TOKEN_PATH}"

    @property
    def authorize_url(self) -> str:
        return f"{self.url}{AUTHORIZE_PATH}"

    @property
    def app(self) -> Flask:
        """The Flask app: wrap its ``wsgi_app`` to add WSGI middleware (a request meter)."""
        return self._app

    def reset(self) -> None:
        """Forget clients, tokens, scripted faults and recorded requests.

        Also wakes handlers still sleeping in a ``Hang`` (they answer 503).
        """
        with self._lock:
            self._wake.set()
            self._wake = threading.Event()
            self._clients.clear()
            self._tokens.clear()
            self._script.clear()
            self.requests = []
            self.echo_credentials = False

    # -- configuration -----------------------------------------------------

    def add_client(self, client_id: str, client_secret: str, *,
                   auth_methods: Iterable[str] = ("client_secret_basic",),
                   rotate_refresh_token: bool = False, return_refresh_token: bool = True,
                   expires_in: int | None = 3600, scope: str = "files.read",
                   answer_format: str = "json", errors_with_200: bool = False) -> None:
        """Register (or replace) a confidential client."""
        if answer_format not in ("json", "form"):
            raise ValueError("answer_format must be 'json' or 'form'")
        methods = tuple(auth_methods)
        unknown = set(methods) - set(AUTH_METHODS)
        if unknown or not methods:
            raise ValueError(f"auth_methods must be a non-empty subset of {AUTH_METHODS}")
        if rotate_refresh_token and not return_refresh_token:
            raise ValueError("a rotating server must return the new refresh token")
        with self._lock:
            self._clients[client_id] = _Client(
                client_id, client_secret, methods, rotate_refresh_token,
                return_refresh_token, expires_in, scope, answer_format, errors_with_200)

    def issue_refresh_token(self, client_id: str, refresh_token: str | None = None,
                            scope: str | None = None) -> str:
        """Seed a valid refresh token for ``client_id`` (default scope: the client's)."""
        with self._lock:
            client = self._clients[client_id]
            value = refresh_token or f"rt-{generate_token(40)}"
            self._tokens[value] = _Token(value, client_id,
                                         client.scope if scope is None else scope)
            return value

    def revoke(self, refresh_token: str) -> None:
        """Make a known refresh token invalid (→ 400 ``invalid_grant``)."""
        with self._lock:
            self._tokens[refresh_token].revoked = True

    def is_active(self, refresh_token: str) -> bool:
        """Whether the server would accept this refresh token now."""
        with self._lock:
            token = self._tokens.get(refresh_token)
            return token is not None and not token.revoked

    def script(self, *responses: ScriptItem) -> None:
        """Queue faults answered, in order, before Authlib handles token requests."""
        for item in responses:
            if not isinstance(item, Fault | Hang):
                raise TypeError(f"not a Fault or Hang: {item!r}")
        with self._lock:
            self._script.extend(responses)

    # -- the Flask app -----------------------------------------------------

    def _make_app(self) -> Flask:
        app = Flask(__name__)
        authz = _AuthorizationServer(app, query_client=self._query_client,
                                     save_token=self._save_token)
        authz.owner = self
        authz.register_token_generator("default", BearerTokenGenerator(
            access_token_generator=lambda **_: f"at-{generate_token(40)}",
            refresh_token_generator=lambda **_: f"rt-{generate_token(40)}",
            expires_generator=lambda client, grant_type: client.expires_in,
        ))
        authz.register_grant(_RefreshTokenGrant)

        @app.before_request
        def record() -> None:
            body = request.get_data(cache=True)
            mimetype = request.mimetype
            form = request.form.to_dict() if mimetype == "application/x-www-form-urlencoded" else {}
            rec = RecordedRequest(
                method=request.method, path=request.path, headers=Headers(request.headers),
                form=form, body=body, time=time.time(), monotonic=time.monotonic(),
                basic_auth=_basic_credentials(request.headers.get("Authorization")))
            g.record = rec
            with self._lock:
                self.requests.append(rec)

        @app.after_request
        def record_outcome(response: Response) -> Response:
            rec: RecordedRequest | None = g.get("record")
            if rec is not None:
                rec.status = response.status_code
                rec.response_text = response.get_data(as_text=True)
            return response

        @app.route(TOKEN_PATH, methods=["GET", "POST", "PUT"])
        def token() -> Response:
            rec: RecordedRequest = g.record
            with self._lock:
                item = self._script.popleft() if self._script else None
                wake = self._wake
            rec.scripted = item
            if isinstance(item, Hang):
                if wake.wait(item.seconds):
                    return _WOKEN.to_response()
                item = item.then
            if isinstance(item, Fault):
                return item.to_response()
            with self._lock:  # refreshes are atomic: one winner per rotated token
                response: Response = authz.create_token_response()
            return self._shape(response, rec)

        @app.route(AUTHORIZE_PATH, methods=["GET"])
        def authorize() -> Response:
            return Response("<html><body>Sign in</body></html>", content_type="text/html")

        return app

    def _shape(self, response: Response, rec: RecordedRequest) -> Response:
        """Authlib's JSON answer as this client's options (and `echo_credentials`) want it."""
        try:
            body = json.loads(response.get_data(as_text=True))
        except ValueError:
            return response
        if not isinstance(body, dict):
            return response
        client = self._request_client(rec)
        status = response.status_code
        if "error" in body and self.echo_credentials:
            body["error_description"] = (
                f"{body.get('error_description') or body['error']}; we received "
                f"refresh_token={rec.form.get('refresh_token')!s} "
                f"client_id={self._sent_client_id(rec)} "
                f"client_secret={self._sent_secret(rec)} "
                f"(decoded {unquote(self._sent_secret(rec))}) "
                f"Authorization: {request.headers.get('Authorization', '')}")
        if "error" in body and client is not None and client.errors_with_200:
            status = 200
        if client is not None and client.answer_format == "form":
            shaped = Response(urlencode({k: v for k, v in body.items() if v is not None}),
                              status=status, content_type="application/x-www-form-urlencoded")
        else:
            shaped = Response(json.dumps(body), status=status, content_type="application/json")
        for name, value in response.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                shaped.headers[name] = value
        return shaped

    def _sent_client_id(self, rec: RecordedRequest) -> str:
        return rec.basic_auth[0] if rec.basic_auth else rec.form.get("client_id", "")

    def _sent_secret(self, rec: RecordedRequest) -> str:
        return rec.basic_auth[1] if rec.basic_auth else rec.form.get("client_secret", "")

    def _request_client(self, rec: RecordedRequest) -> _Client | None:
        name = rec.client_id or unquote(self._sent_client_id(rec))
        with self._lock:
            return self._clients.get(name)

    def _query_client(self, client_id: str) -> _Client | None:
        return self._clients.get(client_id)

    def _save_token(self, token: dict[str, Any], req: Any) -> None:
        value = token.get("refresh_token")
        if value and value not in self._tokens:
            self._tokens[value] = _Token(value, req.client.client_id, token.get("scope", ""))


def _self_signed_context() -> ssl.SSLContext:
    """A server TLS context with a new self-signed certificate for 127.0.0.1."""
    import datetime as dt
    import ipaddress
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = f"{tmp}/cert.pem", f"{tmp}/key.pem"
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        context.load_cert_chain(cert_path, key_path)
    return context


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or " " not in header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
