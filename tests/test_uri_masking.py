"""`check-config` and the logs show a MongoDB URI without any of its credentials."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mwapjobs.config import mask_uri, uri_secrets
from tests.conftest import ROOT

URI = ("mongodb://admin:s3cr%40t-pass@cluster0.example.net/mwap?retryWrites=true"
       "&tlsCertificateKeyFilePassword=keyfile-pass-123&authMechanism=MONGODB-AWS"
       "&authMechanismProperties=AWS_SESSION_TOKEN:session-token-xyz")
SECRETS = ["s3cr@t-pass", "s3cr%40t-pass", "keyfile-pass-123", "session-token-xyz"]


@pytest.mark.parametrize(("uri", "shown"), [
    (URI, "mongodb://admin:********@cluster0.example.net/mwap?retryWrites=true"
          "&tlsCertificateKeyFilePassword=********&authMechanism=MONGODB-AWS"
          "&authMechanismProperties=********"),
    ("mongodb://db1:27017,db2:27017/mwap?replicaSet=rs0",
     "mongodb://db1:27017,db2:27017/mwap?replicaSet=rs0"),
    ("mongodb://user@db/mwap", "mongodb://user:********@db/mwap"),
    ("mongodb://db/mwap?appSecret=abc123456", "mongodb://db/mwap?appSecret=********"),
    ("memory://", "memory://"),
])
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown


def test_uri_secrets_are_every_credential() -> None:
    found = uri_secrets(URI)
    for secret in ("s3cr@t-pass", "keyfile-pass-123", "session-token-xyz"):
        assert secret in found


def test_check_config_prints_no_credential() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MWAPJOBS_")}
    env.update(MONGODB_URI=URI, ENCRYPTION_KEY="0123456789abcdef0123456789abcdef")
    out = subprocess.run([sys.executable, "-m", "mwapjobs", "check-config"], env=env,
                         cwd=ROOT / "tests", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cluster0.example.net" in out.stdout
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr
