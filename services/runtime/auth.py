"""API keys → tenants. Keys are random 256-bit secrets shown once; only their sha256 is stored
(a fast hash is enough for high-entropy keys, unlike passwords)."""
from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid

from .context import LOCAL_TENANT
from .errors import InvalidArgument, Unauthenticated
from .metadata import MetadataStore, Migration

MIGRATIONS = [
    Migration("auth", 1, (
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL)""",
    )),
]

KEY_PREFIX = "pk_"
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyAuthenticator:
    """Resolves `authorization: Bearer <key>` to a tenant, or one local tenant when auth is off."""

    def __init__(self, db: MetadataStore, mode: str):
        self.db = db
        self.mode = mode

    def create_key(self, tenant_id: str, name: str = "") -> tuple[str, str]:
        """Creates a key for `tenant_id`; returns (key_id, key). The key is not stored and cannot be shown again."""
        if not _TENANT_RE.match(tenant_id):
            raise InvalidArgument(f"`tenant` {tenant_id!r} is not valid: use 1–63 lowercase letters, digits, '-' or '_'")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = f"key_{uuid.uuid4().hex[:12]}"
        self.db.execute(
            "INSERT INTO api_keys (key_id, tenant_id, key_hash, name, created_at) VALUES (:id, :t, :h, :n, :now)",
            {"id": key_id, "t": tenant_id, "h": hash_key(key), "n": name, "now": time.time()},
        )
        return key_id, key

    def list_keys(self) -> list[dict]:
        return self.db.query("SELECT key_id, tenant_id, name, created_at FROM api_keys ORDER BY created_at")

    def revoke(self, key_id: str) -> bool:
        return self.db.execute("DELETE FROM api_keys WHERE key_id = :id", {"id": key_id}) > 0

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant an `authorization` metadata value belongs to; Unauthenticated otherwise."""
        if self.mode == "none":
            return LOCAL_TENANT
        if not authorization:
            raise Unauthenticated("no API key: send metadata `authorization: Bearer <key>` "
                                  "(create one with `persona-cli keys create TENANT`; the CLI reads PERSONA_API_KEY)")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("`authorization` metadata must be `Bearer <key>`")
        row = self.db.query_one("SELECT tenant_id FROM api_keys WHERE key_hash = :h", {"h": hash_key(key.strip())})
        if row is None:
            raise Unauthenticated("the API key is not valid: check PERSONA_API_KEY or create a key with `persona-cli keys create`")
        return row["tenant_id"]
