"""Analytics' pure parts: what a quota answer says (as a table), and the snapshots made
from grouped rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mwapjobs.jobs.analytics.quota import Reading, quota_spec, read_quota
from mwapjobs.jobs.analytics.snapshot import assemble

GB = 2**30


@pytest.mark.parametrize(("kind", "status", "payload", "expected"), [
    ("dropbox", 200, {"used": 5, "allocation": {".tag": "individual", "allocated": 9}},
     Reading("ok", 5, 9, http_status=200)),
    ("dropbox", 200, {"used": 5, "allocation": {".tag": "team", "allocated": "9"}},
     Reading("ok", 5, 9, http_status=200)),
    ("dropbox", 200, {"used": -1, "allocation": {"allocated": 9}},
     Reading("bad-answer", message="the byte counts are missing or not numbers",
             http_status=200)),
    ("google", 200, {"storageQuota": {"limit": "16106127360", "usage": "3221225472"}},
     Reading("ok", 3 * GB, 15 * GB, http_status=200)),
    ("google", 200, {"storageQuota": {"usage": "42"}},  # no limit: unlimited
     Reading("ok", 42, None, http_status=200)),
    ("google", 200, {"storageQuota": {"usage": "4.2e9"}},
     Reading("bad-answer", message="the byte counts are missing or not numbers",
             http_status=200)),
    ("google", 200, {"user": {}}, Reading("bad-answer", message="no storageQuota",
                                          http_status=200)),
    ("microsoft", 200, {"quota": {"total": 100, "used": 30, "state": "normal"}},
     Reading("ok", 30, 100, http_status=200)),
    ("microsoft", 200, {"quota": {"total": True, "used": 30}},  # a bool is no count
     Reading("bad-answer", message="the byte counts are missing or not numbers",
             http_status=200)),
    ("microsoft", 200, ["not", "an", "object"],
     Reading("bad-answer", message="the answer is not a JSON object", http_status=200)),
    ("google", 401, None, Reading("unauthorized", message="HTTP 401", http_status=401)),
    ("dropbox", 429, {"error": "too_many_requests"},
     Reading("failed", message="HTTP 429", http_status=429)),
    ("microsoft", 503, None, Reading("failed", message="HTTP 503", http_status=503)),
    ("generic", 200, {}, Reading("unsupported", http_status=200)),
])
def test_what_a_quota_answer_says(kind: Any, status: int, payload: Any,
                                  expected: Reading) -> None:
    assert read_quota(kind, status, payload) == expected


def test_quota_requests_per_kind() -> None:
    assert quota_spec("dropbox", {}).url == "https://api.dropboxapi.com/2/users/get_space_usage"
    assert quota_spec("dropbox", {}).json_null_body and quota_spec("dropbox", {}).method == "POST"
    assert quota_spec("dropbox", {"apiBaseUrl": "https://x.test/2/"}).url == \
        "https://x.test/2/users/get_space_usage"
    assert quota_spec("google", {}).url == \
        "https://www.googleapis.com/drive/v3/about?fields=storageQuota"
    assert quota_spec("microsoft", {}).url == "https://graph.microsoft.com/v1.0/me/drive"
    assert quota_spec("generic", {}).url is None
    assert quota_spec("google", {"quotaUrl": "https://proxy.test/q"}).url == \
        "https://proxy.test/q"
    assert quota_spec("google", {"quotaUrl": "ftp://nope"}).url is not None  # ignored


AT = datetime(2026, 12, 1, 23, 55, tzinfo=UTC)
T1, T2, GONE = "a" * 24, "b" * 24, "c" * 24
P = "p" * 24


def test_assemble_makes_one_document_per_tenant_and_the_platform_sums() -> None:
    docs = assemble(
        day="2026-12-01", at=AT, tenant_ids=[T1, T2],
        projects=[{"_id": T1, "projects": 3, "archived": 1}, {"_id": GONE, "projects": 9}],
        members=[{"_id": T1, "members": 4}],
        integrations=[{"_id": {"t": T1, "p": P, "s": "active"}, "n": 2, "connected": 2},
                      {"_id": {"t": T1, "p": P, "s": "expired"}, "n": 1, "connected": 1},
                      {"_id": {"t": T2, "p": P, "s": None}, "n": 1, "connected": 0},
                      {"_id": {"t": GONE, "p": P, "s": "active"}, "n": 5, "connected": 5}],
        health=[{"_id": {"t": T1, "o": "healthy"}, "n": 2}, {"_id": {"t": T1, "o": "expired"},
                                                            "n": 1}],
        quota=[{"_id": T1, "used": 10, "allocated": 100, "readings": 2,
                "items": [{"integrationId": "i2", "state": "ok"},
                          {"integrationId": "i1", "state": "ok"}]}],
        files=[{"_id": T2, "files": 7, "bytes": 700}],
        activity=[{"tenantId": T1, "refresh": {"refreshed": 24, "transientFailure": 1}}],
        providers={P: {"_id": P, "name": "Google Drive", "slug": "google-drive"}})
    t1, t2, platform = docs
    assert t1["_id"] == f"tenant:{T1}:2026-12-01" and platform["_id"] == "platform:2026-12-01"
    assert t1["projects"] == {"total": 3, "archived": 1} and t1["members"] == 4
    assert t1["integrations"]["total"] == 3 and t1["integrations"]["connected"] == 3
    assert t1["integrations"]["byStatus"] == {"active": 2, "expired": 1, "revoked": 0,
                                              "error": 0}
    [drive] = t1["integrations"]["byProvider"]
    assert (drive["provider"], drive["kind"], drive["total"]) == ("Google Drive", "google", 3)
    assert t2["integrations"]["byStatus"]["active"] == 1  # no status: the default, active
    assert t1["health"]["healthy"] == 2 and t1["health"]["expired"] == 1
    assert [i["integrationId"] for i in t1["quota"]["items"]] == ["i1", "i2"]
    assert t1["refresh"]["refreshed"] == 24 and t2["refresh"]["refreshed"] == 0
    assert t2["files"] == {"files": 7, "bytes": 700} and t1["files"] == {"files": 0, "bytes": 0}
    # the platform: sums over the tenants that exist (the gone one's rows are left out)
    assert platform["tenantId"] is None and platform["tenants"] == 2
    assert platform["projects"]["total"] == 3 and platform["integrations"]["total"] == 4
    assert platform["quota"] == {"readings": 2, "used": 10, "allocated": 100}
    assert platform["files"] == {"files": 7, "bytes": 700}
    assert platform["refresh"]["refreshed"] == 24


def test_without_file_indexing_files_is_null() -> None:
    [tenant, platform] = assemble(day="d", at=AT, tenant_ids=[T1], projects=[], members=[],
                                  integrations=[], health=[], quota=[], files=None,
                                  activity=[], providers={})
    assert tenant["files"] is None and platform["files"] is None
