"""Tests for MWAP's encryption-at-rest format (mwapjobs.crypto).

The vectors in tests/data/mwap-encryption.json were produced by Node.js crypto
in the MWAP backend format; decrypting them is the ground truth for
compatibility.  The Node interop tests additionally check the other direction
(Node reading what we write) whenever ``node`` is installed.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mwapjobs.crypto import DecryptionError, MwapCipher

VECTORS_PATH = Path(__file__).parent / "data" / "mwap-encryption.json"
VECTORS: list[dict[str, str]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]

KEY32 = "0123456789abcdef0123456789abcdef"
SHORT_KEY = "short-key"
LONG_KEY = "this-key-is-much-longer-than-thirty-two-bytes-and-gets-truncated"
UNICODE_KEY = "clé-secrète-ü"
# 31 ASCII bytes + a 2-byte character: truncation to 32 bytes splits it.
SPLIT_UNICODE_KEY = "k" * 31 + "é" + "tail"
KEYS = [KEY32, SHORT_KEY, LONG_KEY, UNICODE_KEY, SPLIT_UNICODE_KEY]

TEXTS = [
    "ya29.a0AfH6SMBx-access-token",
    "1//0gLONG-refresh_token/with+odd=chars",
    "ü unicode ✓ token 🚀",
    "a:b:c",
    "x" * 5000,
    "y",
]

B64_PART = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def _vector_id(vector: dict[str, str]) -> str:
    return f"{vector['key_name']}-{vector['plaintext'][:12]!r}-len{len(vector['plaintext'])}"


def _tamper(stored: str, part: int) -> str:
    parts = stored.split(":")
    raw = bytearray(base64.b64decode(parts[part]))
    raw[0] ^= 0x01
    parts[part] = base64.b64encode(bytes(raw)).decode()
    return ":".join(parts)


# --------------------------------------------------------------------------- vectors


def test_vector_file_covers_expected_cases() -> None:
    """Guard against the vector file being swapped for a thinner one."""
    names = {v["key_name"] for v in VECTORS}
    assert {"exact32", "short", "long", "unicode"} <= names
    assert any(v["plaintext"] == "" and v["ciphertext"] == "" for v in VECTORS)
    assert any(len(v["key"].encode()) > 32 for v in VECTORS)
    assert any(len(v["key"].encode()) < 32 for v in VECTORS)
    assert any(not v["plaintext"].isascii() for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_node_vectors_decrypt(vector: dict[str, str]) -> None:
    cipher = MwapCipher(vector["key"])
    assert cipher.decrypt(vector["ciphertext"]) == vector["plaintext"]
    assert cipher.decrypt_lenient(vector["ciphertext"]) == vector["plaintext"]
    if vector["ciphertext"]:
        assert MwapCipher.looks_encrypted(vector["ciphertext"])


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["ciphertext"]], ids=_vector_id)
def test_node_vectors_reject_other_keys(vector: dict[str, str]) -> None:
    wrong = MwapCipher(vector["key"] + "-not")
    if len(vector["key"].encode()) >= 32:
        # Anything past byte 32 is ignored, so appending does not change the key.
        wrong = MwapCipher("X" + vector["key"])
    with pytest.raises(DecryptionError):
        wrong.decrypt(vector["ciphertext"])


def test_key_truncation_ignores_bytes_past_32() -> None:
    stored = MwapCipher(LONG_KEY).encrypt("tok")
    assert MwapCipher(LONG_KEY[:32]).decrypt(stored) == "tok"
    assert MwapCipher(LONG_KEY[:32] + "anything else").decrypt(stored) == "tok"


def test_key_padding_is_zero_bytes() -> None:
    stored = MwapCipher(SHORT_KEY).encrypt("tok")
    assert MwapCipher(SHORT_KEY + "\0" * 5).decrypt(stored) == "tok"
    with pytest.raises(DecryptionError):
        MwapCipher(SHORT_KEY + " ").decrypt(stored)


# ------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("text", TEXTS, ids=lambda t: f"{t[:10]!r}-len{len(t)}")
def test_round_trip(key: str, text: str) -> None:
    cipher = MwapCipher(key)
    stored = cipher.encrypt(text)
    assert stored != text
    assert cipher.decrypt(stored) == text
    assert cipher.decrypt_lenient(stored) == text


def test_empty_string_maps_to_itself() -> None:
    cipher = MwapCipher(KEY32)
    assert cipher.encrypt("") == ""
    assert cipher.decrypt("") == ""
    assert cipher.decrypt_lenient("") == ""
    assert not MwapCipher.looks_encrypted("")


def test_encryption_is_randomised() -> None:
    cipher = MwapCipher(KEY32)
    first, second = cipher.encrypt("same"), cipher.encrypt("same")
    assert first != second
    assert first.split(":")[0] != second.split(":")[0]  # fresh IV
    assert cipher.decrypt(first) == cipher.decrypt(second) == "same"


def test_salt_is_32_lowercase_hex_chars() -> None:
    """Check the hidden salt prefix by decrypting with AESGCM directly."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    stored = MwapCipher(SHORT_KEY).encrypt("payload")
    iv, tag, ct = (base64.b64decode(p) for p in stored.split(":"))
    key = SHORT_KEY.encode().ljust(32, b"\0")
    plain = AESGCM(key).decrypt(iv, ct + tag, None).decode()
    assert re.fullmatch(r"[0-9a-f]{32}payload", plain)


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize("text", TEXTS, ids=lambda t: f"{t[:10]!r}-len{len(t)}")
def test_output_format(text: str) -> None:
    stored = MwapCipher(KEY32).encrypt(text)
    parts = stored.split(":")
    assert len(parts) == 3
    for part in parts:
        assert B64_PART.fullmatch(part)
        assert len(part) % 4 == 0
    iv, tag, ct = (base64.b64decode(p, validate=True) for p in parts)
    assert len(iv) == 16
    assert len(tag) == 16
    # GCM is a stream mode: ciphertext length = salt + UTF-8 text length.
    assert len(ct) == 32 + len(text.encode("utf-8"))
    assert MwapCipher.looks_encrypted(stored)


@pytest.mark.parametrize(
    "value",
    [
        "ya29.plain",
        "secret:with:colons",
        "abc:def:ghi",
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==",  # two parts
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:AAAA:AAAA",  # four parts
        "AAAAAAAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAA==:AAAA",  # 12-byte iv
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAA:AAAA",  # 9-byte tag
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA:AAAA",  # tag missing padding
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:AA AA",  # whitespace
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:AA-_",  # urlsafe alphabet
        "",
    ],
)
def test_looks_encrypted_rejects_non_ciphertext(value: str) -> None:
    assert not MwapCipher.looks_encrypted(value)


def test_looks_encrypted_accepts_shape_without_key() -> None:
    assert MwapCipher.looks_encrypted("AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:AAAA")


# ------------------------------------------------------------------- strict failures


def test_wrong_key_raises() -> None:
    stored = MwapCipher(KEY32).encrypt("secret-token")
    with pytest.raises(DecryptionError):
        MwapCipher("another-key").decrypt(stored)


@pytest.mark.parametrize("part", [0, 1, 2], ids=["iv", "tag", "ciphertext"])
def test_tampering_raises(part: int) -> None:
    cipher = MwapCipher(KEY32)
    stored = cipher.encrypt("secret-token")
    with pytest.raises(DecryptionError):
        cipher.decrypt(_tamper(stored, part))


def test_truncated_ciphertext_raises() -> None:
    cipher = MwapCipher(KEY32)
    iv, tag, ct = cipher.encrypt("secret-token").split(":")
    shorter = base64.b64encode(base64.b64decode(ct)[:-1]).decode()
    with pytest.raises(DecryptionError):
        cipher.decrypt(f"{iv}:{tag}:{shorter}")


def test_swapped_parts_raise() -> None:
    cipher = MwapCipher(KEY32)
    iv, tag, ct = cipher.encrypt("secret-token").split(":")
    with pytest.raises(DecryptionError):
        cipher.decrypt(f"{tag}:{iv}:{ct}")


@pytest.mark.parametrize(
    "value",
    [
        "ya29.plain",
        "secret:with:colons",
        "!!!:@@@:###",
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:AAAA",
        "AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==:",
        ":::",
        "\x00\xff",
    ],
)
def test_garbage_raises(value: str) -> None:
    with pytest.raises(DecryptionError):
        MwapCipher(KEY32).decrypt(value)


def test_authentic_but_too_short_plaintext_raises() -> None:
    """Authentic data without the 32-char salt was not written by the backend."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = KEY32.encode()
    iv = b"\x01" * 16
    sealed = AESGCM(key).encrypt(iv, b"0123456789abcdef", None)
    stored = ":".join(base64.b64encode(p).decode() for p in (iv, sealed[-16:], sealed[:-16]))
    with pytest.raises(DecryptionError):
        MwapCipher(KEY32).decrypt(stored)


def test_authentic_but_invalid_utf8_raises_without_leaking() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = KEY32.encode()
    iv = b"\x02" * 16
    secret = b"a" * 32 + b"PLAINSECRET\xff"
    sealed = AESGCM(key).encrypt(iv, secret, None)
    stored = ":".join(base64.b64encode(p).decode() for p in (iv, sealed[-16:], sealed[:-16]))
    with pytest.raises(DecryptionError) as info:
        MwapCipher(KEY32).decrypt(stored)
    assert "PLAINSECRET" not in str(info.value)
    # No underlying UnicodeDecodeError (which would hold the plaintext bytes).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_error_messages_do_not_leak() -> None:
    key = "super-secret-key-value"
    plaintext = "ya29.very-secret-token"
    stored = MwapCipher(key).encrypt(plaintext)
    failures: list[DecryptionError] = []
    for cipher, value in [
        (MwapCipher("wrong-key-value"), stored),
        (MwapCipher(key), _tamper(stored, 2)),
        (MwapCipher(key), plaintext),
        (MwapCipher(key), f"{plaintext}:{key}:{plaintext}"),
    ]:
        with pytest.raises(DecryptionError) as info:
            cipher.decrypt(value)
        failures.append(info.value)
    for exc in failures:
        rendered = f"{exc!s} {exc!r} {exc.args!r}"
        for secret in (key, plaintext, "very-secret", "super-secret"):
            assert secret not in rendered
        assert exc.__cause__ is None
        assert exc.__context__ is None


def test_decryption_error_is_value_error() -> None:
    assert issubclass(DecryptionError, ValueError)


# ------------------------------------------------------------------------- lenient


@pytest.mark.parametrize(
    "value",
    [
        "ya29.plain",
        "secret:with:colons",
        "abc:def:ghi",  # three colon parts, valid-looking chars, wrong sizes
        "!!!:@@@:###",  # three colon parts, not base64 at all
        "GOCSPX-client_secret_value",
        "1//0gLONG-refresh_token/with+odd=chars",
        "ü plaintext ✓",
    ],
)
def test_lenient_returns_plaintext_unchanged(value: str) -> None:
    assert MwapCipher(KEY32).decrypt_lenient(value) == value


def test_lenient_decrypts_real_ciphertext() -> None:
    cipher = MwapCipher(SHORT_KEY)
    assert cipher.decrypt_lenient(cipher.encrypt("ya29.token")) == "ya29.token"
    node_vector = next(v for v in VECTORS if v["key_name"] == "long" and v["plaintext"])
    assert (
        MwapCipher(node_vector["key"]).decrypt_lenient(node_vector["ciphertext"])
        == node_vector["plaintext"]
    )


def test_lenient_wrong_key_falls_back_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Matches the backend (raw value back) but makes the likely misconfiguration visible."""
    key = "the-real-key"
    stored = MwapCipher(key).encrypt("ya29.hidden")
    with caplog.at_level(logging.WARNING, logger="mwapjobs.crypto"):
        assert MwapCipher("wrong-key").decrypt_lenient(stored) == stored
    assert any("ENCRYPTION_KEY" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert stored not in record.getMessage()
        assert key not in record.getMessage()


def test_lenient_plaintext_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mwapjobs.crypto"):
        MwapCipher(KEY32).decrypt_lenient("secret:with:colons")
    assert not caplog.records


# ------------------------------------------------------------------- key handling


def test_empty_key_rejected() -> None:
    with pytest.raises(ValueError):
        MwapCipher("")


def test_repr_and_state_do_not_reveal_key() -> None:
    key = "super-secret-key-value-1234"
    cipher = MwapCipher(key)
    assert key not in repr(cipher)
    assert key not in str(cipher)
    assert "redacted" in repr(cipher)
    assert not hasattr(cipher, "__dict__")
    with pytest.raises(TypeError):
        pickle.dumps(cipher)


# ---------------------------------------------------------------------- Node interop

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not on PATH")

# Reads {"op": "decrypt"|"encrypt", "items": [{"key": ..., "value": ...}]} from
# stdin and prints a JSON list of results.  Mirrors the MWAP backend code path.
NODE_SCRIPT = r"""
const crypto = require('crypto');
function key32(key) {
  const out = Buffer.alloc(32);  // zero-filled
  Buffer.from(key, 'utf8').copy(out, 0, 0, 32);
  return out;
}
function encrypt(key, text) {
  if (!text) return '';
  const iv = crypto.randomBytes(16);
  const salt = crypto.randomBytes(16).toString('hex');
  const cipher = crypto.createCipheriv('aes-256-gcm', key32(key), iv);
  let enc = cipher.update(salt + text, 'utf8', 'base64');
  enc += cipher.final('base64');
  const tag = cipher.getAuthTag();
  return iv.toString('base64') + ':' + tag.toString('base64') + ':' + enc;
}
function decrypt(key, stored) {
  if (!stored) return '';
  const [iv, tag, enc] = stored.split(':');
  const decipher = crypto.createDecipheriv(
    'aes-256-gcm', key32(key), Buffer.from(iv, 'base64'), { authTagLength: 16 });
  decipher.setAuthTag(Buffer.from(tag, 'base64'));
  let out = decipher.update(enc, 'base64', 'utf8');
  out += decipher.final('utf8');
  return out.substring(32);
}
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const req = JSON.parse(input);
  const fn = req.op === 'encrypt' ? encrypt : decrypt;
  process.stdout.write(JSON.stringify(req.items.map((it) => fn(it.key, it.value))));
});
"""

INTEROP_CASES = [
    (KEY32, "ya29.a0AfH6SMBx-access-token"),
    (SHORT_KEY, "1//0gLONG-refresh_token/with+odd=chars"),
    (LONG_KEY, "ü unicode ✓ token 🚀"),
    (UNICODE_KEY, "secret:with:colons"),
    (SPLIT_UNICODE_KEY, "split-key token ✓"),
    (LONG_KEY, "z" * 3000),
    (KEY32, ""),
]


def _run_node(tmp_path: Path, op: str, items: list[dict[str, str]]) -> list[Any]:
    assert NODE is not None
    script = tmp_path / "mwap_crypto.js"
    script.write_text(NODE_SCRIPT, encoding="utf-8")
    proc = subprocess.run(
        [NODE, str(script)],
        input=json.dumps({"op": op, "items": items}),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: list[Any] = json.loads(proc.stdout)
    return result


@needs_node
def test_node_decrypts_python_ciphertext(tmp_path: Path) -> None:
    items = [{"key": k, "value": MwapCipher(k).encrypt(t)} for k, t in INTEROP_CASES]
    assert _run_node(tmp_path, "decrypt", items) == [t for _, t in INTEROP_CASES]


@needs_node
def test_python_decrypts_node_ciphertext(tmp_path: Path) -> None:
    items = [{"key": k, "value": t} for k, t in INTEROP_CASES]
    stored = _run_node(tmp_path, "encrypt", items)
    assert len(stored) == len(INTEROP_CASES)
    for (key, text), value in zip(INTEROP_CASES, stored, strict=True):
        assert MwapCipher(key).decrypt(value) == text
        if text:
            assert MwapCipher.looks_encrypted(value)
