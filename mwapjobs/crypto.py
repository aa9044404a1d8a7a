"""MWAP's encryption-at-rest format, byte-compatible with the Node backend.

The daemon reads and writes the same MongoDB documents as the MWAP Node
backend, so OAuth tokens and client secrets have to be stored in exactly the
format the backend produces and accepts:

* AES-256-GCM, no associated data;
* key = UTF-8 bytes of ``ENCRYPTION_KEY`` zero-padded or truncated to 32 bytes
  (no KDF -- that is what the backend does, so we must do it too);
* a random 16-byte IV and the full 16-byte tag;
* the encrypted plaintext is 32 random lowercase hex characters of "salt"
  followed by the text;
* stored as ``base64(iv):base64(tag):base64(ciphertext)``;
* the empty string is stored as itself.

The format is not ours to improve; anything "better" would be unreadable by
the backend.  Our only freedom is in how strictly we parse, and we are strict
unless the caller explicitly asks for the backend's legacy leniency.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["DecryptionError", "MwapCipher"]

_log = logging.getLogger(__name__)

_KEY_BYTES: Final = 32
_IV_BYTES: Final = 16
_TAG_BYTES: Final = 16
# 16 random bytes rendered as hex by the backend, i.e. 32 characters.
_SALT_CHARS: Final = 32
_SEPARATOR: Final = ":"


class DecryptionError(ValueError):
    """A stored value could not be decrypted.

    Raised with fixed, generic messages only: the exception may end up in logs
    or job-failure records, so it must never carry the key, the plaintext or
    the stored value, and it is raised outside ``except`` blocks so that no
    underlying exception (e.g. a ``UnicodeDecodeError`` holding the decrypted
    bytes) is attached as ``__cause__`` or ``__context__``.
    """


def _b64decode(part: str) -> bytes | None:
    """Decode one part strictly, or return None.

    Strict (``validate=True``) because the backend always writes canonical
    padded base64; accepting Node's much looser decoder would only widen what
    we mistake for ciphertext in the lenient path.
    """
    try:
        return base64.b64decode(part, validate=True)
    except (binascii.Error, ValueError):
        return None


def _split(stored: str) -> tuple[bytes, bytes, bytes] | None:
    """Parse the stored form into (iv, tag, ciphertext), or None if it is not one.

    The lengths are checked here rather than left to AES-GCM because Node's
    ``setAuthTag`` accepts truncated tags; insisting on 16 bytes keeps a
    shortened tag from weakening authentication.
    """
    parts = stored.split(_SEPARATOR)
    if len(parts) != 3:
        return None
    iv, tag, ciphertext = (_b64decode(part) for part in parts)
    if iv is None or tag is None or ciphertext is None:
        return None
    if len(iv) != _IV_BYTES or len(tag) != _TAG_BYTES:
        return None
    return iv, tag, ciphertext


def _utf8_or_none(data: bytes) -> str | None:
    """Decode UTF-8 without letting the error (which holds ``data``) escape."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class MwapCipher:
    """Encrypts and decrypts values exactly as the MWAP backend does.

    Only the derived AES key object is kept, never the key string, so the
    key cannot leak through ``repr``, ``vars`` or an accidental log line.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: str) -> None:
        """Derive the AES key the way the backend does (pad/truncate, no KDF).

        An empty key is rejected because it would silently produce the
        all-zero key; the backend never runs that way in practice, and a
        missing setting should fail loudly at startup, not corrupt data.
        """
        if not key:
            raise ValueError("encryption key must not be empty")
        raw = key.encode("utf-8")[:_KEY_BYTES].ljust(_KEY_BYTES, b"\0")
        self._aead = AESGCM(raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key=<redacted>)"

    def __reduce__(self) -> str | tuple[object, ...]:
        """Refuse pickling: a pickled cipher would be the key written to disk."""
        raise TypeError(f"{type(self).__name__} must not be pickled")

    def encrypt(self, text: str) -> str:
        """Encrypt ``text`` into the backend's stored form.

        ``''`` maps to ``''`` because the backend stores empty values that way
        and reads ``''`` back as empty; encrypting it would be harmless but
        would make the daemon's writes differ from the backend's.

        Text that is not encodable as UTF-8 (lone surrogates) raises
        ``UnicodeEncodeError`` rather than being silently altered, since an
        altered token is worse than a failed write.
        """
        if text == "":
            return ""
        salt = secrets.token_hex(_SALT_CHARS // 2)
        iv = os.urandom(_IV_BYTES)
        sealed = self._aead.encrypt(iv, (salt + text).encode("utf-8"), None)
        ciphertext, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
        return _SEPARATOR.join(
            base64.b64encode(part).decode("ascii") for part in (iv, tag, ciphertext)
        )

    def decrypt(self, stored: str) -> str:
        """Decrypt a value the backend (or :meth:`encrypt`) wrote.

        Strict: anything that is not well-formed, authentic ciphertext under
        this key raises :class:`DecryptionError`.  Use this where a plaintext
        value can only mean misconfiguration or tampering.
        """
        if stored == "":
            return ""
        parsed = _split(stored)
        if parsed is None:
            raise DecryptionError("value is not in the MWAP encrypted format")
        iv, tag, ciphertext = parsed
        plain: bytes | None
        try:
            plain = self._aead.decrypt(iv, ciphertext + tag, None)
        except InvalidTag:
            plain = None
        if plain is None:
            raise DecryptionError("authentication failed (wrong key or tampered value)")
        text = _utf8_or_none(plain)
        # The backend only ever encrypts 32 hex chars + text, so authentic data
        # that is shorter or not UTF-8 was not produced by it.
        if text is None or len(text) < _SALT_CHARS:
            raise DecryptionError("decrypted value is not in the MWAP plaintext layout")
        return text[_SALT_CHARS:]

    def decrypt_lenient(self, stored: str) -> str:
        """Decrypt like the backend's fallback: return ``stored`` if it fails.

        MWAP data legitimately contains plaintext: client secrets in
        ``cloudProviders.clientSecret`` predating encryption, and tokens
        written through the backend's PATCH endpoint.  The backend treats any
        value it cannot decrypt as plaintext, so the daemon must too.

        A value that *looks* encrypted but fails authentication is almost
        certainly a wrong ``ENCRYPTION_KEY`` rather than plaintext, so that
        case is logged (without the value) to make the misconfiguration
        visible, while still following the backend's behaviour.
        """
        try:
            return self.decrypt(stored)
        except DecryptionError:
            if self.looks_encrypted(stored):
                _log.warning(
                    "value looks encrypted but does not decrypt with the configured "
                    "ENCRYPTION_KEY; treating it as plaintext like the MWAP backend does"
                )
            return stored

    @staticmethod
    def looks_encrypted(stored: str) -> bool:
        """Tell ciphertext from plaintext without needing the key.

        Useful for migrations and diagnostics (e.g. counting plaintext
        secrets) where the key may be unavailable.  A real token or secret is
        vanishingly unlikely to be three strict base64 parts whose first two
        decode to exactly 16 bytes each.
        """
        return _split(stored) is not None
