"""Metadata store (migrations, transactions) and the content-addressed artifact store."""
import hashlib
import os
import sqlite3

import pytest

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import InvalidArgument, NotFound
from persona.services.runtime.metadata import Migration, SQLiteMetadataStore
from persona.services.runtime.paging import keyset_clause, next_token, parse_page


def test_migrations_apply_once_in_order_and_wal_is_on(tmp_path):
    db = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    migrations = [Migration("things", 2, ("ALTER TABLE things ADD COLUMN colour TEXT DEFAULT ''",)),
                  Migration("things", 1, ("CREATE TABLE things (id TEXT PRIMARY KEY)",))]
    assert db.migrate(migrations) == [("things", 1), ("things", 2)]
    assert db.migrate(migrations) == []
    db.execute("INSERT INTO things (id, colour) VALUES ('a', 'red')")
    assert db.query_one("PRAGMA journal_mode")["journal_mode"] == "wal"
    db.close()
    reopened = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    assert reopened.migrate(migrations) == []
    assert reopened.query("SELECT * FROM things") == [{"id": "a", "colour": "red"}]


def test_a_failed_transaction_leaves_nothing(tmp_path):
    db = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    db.migrate([Migration("t", 1, ("CREATE TABLE t (id TEXT PRIMARY KEY)",))])
    db.execute("INSERT INTO t VALUES ('kept')")
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction():
            db.execute("INSERT INTO t VALUES ('new')")
            db.execute("INSERT INTO t VALUES ('kept')")  # duplicate: the whole transaction rolls back
    assert db.query("SELECT id FROM t") == [{"id": "kept"}]


def test_a_failed_migration_is_not_recorded(tmp_path):
    db = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    with pytest.raises(sqlite3.OperationalError):
        db.migrate([Migration("bad", 1, ("CREATE TABLE ok (id TEXT)", "NOT SQL"))])
    assert db.query("SELECT * FROM schema_migrations") == []
    assert db.query("SELECT name FROM sqlite_master WHERE name = 'ok'") == []


def test_artifacts_are_content_addressed_and_written_whole(tmp_path):
    store = LocalArtifactStore(tmp_path / "a")
    digest = store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.put(b"hello") == digest
    assert store.get(digest) == b"hello"
    path = store.path_of(digest)
    assert path.parent.name == digest[:2] and path.name == digest[2:]
    leftovers = [name for _, _, files in os.walk(tmp_path) for name in files if name.startswith(".tmp-")]
    assert leftovers == []
    with pytest.raises(NotFound):
        store.get(hashlib.sha256(b"absent").hexdigest())
    with pytest.raises(NotFound):
        store.get("../../etc/passwd")


def test_paging_tokens_round_trip_and_bad_tokens_name_the_field():
    page = parse_page(2, "")
    rows = [{"created_at": 3.0, "id": "c"}, {"created_at": 2.0, "id": "b"}, {"created_at": 1.0, "id": "a"}]
    token = next_token(rows, page, "id")
    after = parse_page(2, token)
    assert after.after == (2.0, "b")
    clause, params = keyset_clause(after, "id")
    assert params == {"after_ts": 2.0, "after_id": "b"} and "created_at <" in clause
    assert next_token(rows[:2], page, "id") == ""
    with pytest.raises(InvalidArgument, match="`page.page_token`"):
        parse_page(0, "garbage!")
    with pytest.raises(InvalidArgument, match="`page.page_size`"):
        parse_page(501, "")
