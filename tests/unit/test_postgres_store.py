"""PostgresMetadataStore on a real PostgreSQL server (tests/postgres_fixture.py): the MetadataStore contract, run on
SQLite too so both stores are held to the same semantics; SQL translation; migrations of the whole app, concurrent
and repeated; errors naming PERSONA_DATABASE_URL without the password; and one flow through the gRPC API with
PERSONA_DATABASE_URL set (subject → case 1 captions → tiny LoRA → one image) whose rows land in Postgres."""
from __future__ import annotations

import threading
import time

import pytest

import postgres_fixture
from persona.services.runtime.errors import FailedPrecondition, InvalidSetting, Unavailable
from persona.services.runtime.metadata import Migration, SQLiteMetadataStore
from persona.services.runtime.postgres import PostgresMetadataStore, defer_foreign_keys, redact, translate
from persona.services.runtime.settings import RuntimeSettings


TABLES = Migration("contract", 1, (
    """CREATE TABLE items (
        id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL DEFAULT 0, data BLOB,
        flag INTEGER NOT NULL DEFAULT 0, note TEXT NOT NULL DEFAULT '')""",
    "CREATE TABLE events (k TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (k, seq))",
))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        db = SQLiteMetadataStore(tmp_path / "metadata.sqlite3")
    else:
        db = PostgresMetadataStore(request.getfixturevalue("postgres_dsn"))
    db.migrate([TABLES])
    yield db
    db.close()


def _ids(store) -> list[str]:
    return [r["id"] for r in store.query("SELECT id FROM items ORDER BY id")]


# -- the contract, on both stores -------------------------------------------------------------------------------

def test_nested_transactions_commit_together(store):
    with store.transaction():
        store.execute("INSERT INTO items (id) VALUES (:id)", {"id": "a"})
        with store.transaction():
            store.execute("INSERT INTO items (id) VALUES (:id)", {"id": "b"})
        assert _ids(store) == ["a", "b"]  # the transaction sees its own writes
    assert _ids(store) == ["a", "b"]


def test_an_error_rolls_back_inner_and_outer_blocks(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.execute("INSERT INTO items (id) VALUES ('a')")
            with store.transaction():
                store.execute("INSERT INTO items (id) VALUES ('b')")
                raise RuntimeError("boom")
    assert _ids(store) == []
    # An inner block's error caught by the outer block: the inner writes stay (they joined the outer one).
    with store.transaction():
        store.execute("INSERT INTO items (id) VALUES ('c')")
        try:
            with store.transaction():
                store.execute("INSERT INTO items (id) VALUES ('d')")
                raise KeyError("handled")
        except KeyError:
            pass
    assert _ids(store) == ["c", "d"]


def test_rowcounts_and_dict_rows(store):
    for i in range(3):
        assert store.execute("INSERT INTO items (id, n) VALUES (:id, :n)", {"id": f"i{i}", "n": i}) == 1
    assert store.execute("UPDATE items SET note = :note WHERE n >= :min", {"note": "x", "min": 1}) == 2
    assert store.execute("DELETE FROM items WHERE id = :id", {"id": "absent"}) == 0
    assert store.query_one("SELECT id, n, note FROM items WHERE id = :id", {"id": "i2"}) == {"id": "i2", "n": 2,
                                                                                            "note": "x"}
    assert store.query_one("SELECT id FROM items WHERE id = :id", {"id": "absent"}) is None
    row = store.query_one("SELECT COUNT(*) AS c, SUM(n) AS s, AVG(n) AS a, COALESCE(MAX(n), 0) AS m FROM items")
    assert row == {"c": 3, "s": 3, "a": 1.0, "m": 2}
    assert [type(row[k]) for k in ("c", "s", "a", "m")] == [int, int, float, int]  # never Decimal
    assert store.query_one("SELECT COALESCE(MAX(seq), 0) AS s FROM events WHERE k = :k", {"k": "none"}) == {"s": 0}


def test_values_keep_their_types(store):
    blob = bytes(range(256)) * 3
    stamp = time.time()
    store.execute("INSERT INTO items (id, n, at, data, flag) VALUES (:id, :n, :at, :data, :flag)",
                  {"id": "v", "n": 2**40, "at": stamp, "data": blob, "flag": True})
    row = store.query_one("SELECT * FROM items WHERE id = 'v'")
    assert type(row["data"]) is bytes and row["data"] == blob
    assert row["at"] == stamp and type(row["at"]) is float  # 8-byte floats: time.time() comes back exactly
    assert row["n"] == 2**40  # INTEGER is 64-bit on both
    assert row["flag"] == 1  # bools are stored as 0/1
    for value in (1.0000000000000002, 1e-300, 1754321098.1234567):
        store.execute("UPDATE items SET at = :at WHERE id = 'v'", {"at": value})
        assert store.query_one("SELECT at FROM items WHERE at = :at", {"at": value})["at"] == value
    assert store.query_one("SELECT id FROM items WHERE flag = :f", {"f": True}) == {"id": "v"}


def test_colons_and_percents_in_literals_are_not_parameters(store):
    store.execute("INSERT INTO items (id, note) VALUES (:id, 'a:b :not_a_param 100% -- x')", {"id": "lit"})
    row = store.query_one("SELECT note, 'x:y' AS c, '%' AS p FROM items WHERE id = :id AND note LIKE '%:not%'",
                          {"id": "lit"})
    assert row == {"note": "a:b :not_a_param 100% -- x", "c": "x:y", "p": "%"}
    # The same parameter twice, and compared with '' (the job list's optional filters).
    rows = store.query("SELECT id FROM items WHERE (:k = '' OR id = :k) ORDER BY id", {"k": ""})
    assert [r["id"] for r in rows] == ["lit"]
    assert store.query("SELECT id FROM items WHERE (:k = '' OR id = :k)", {"k": "other"}) == []
    assert store.query("SELECT id FROM items LIMIT :n", {"n": 0}) == []


def test_upserts_portable_to_both(store):
    sql = ("INSERT INTO items (id, note) VALUES (:id, :note) ON CONFLICT (id) DO UPDATE SET note = excluded.note")
    store.execute(sql, {"id": "u", "note": "one"})
    store.execute(sql, {"id": "u", "note": "two"})
    assert store.query("SELECT id, note FROM items") == [{"id": "u", "note": "two"}]


def test_text_sorts_bytewise(store):
    for value in ("b", "B", "a_b", "ab", "a-c", "é"):
        store.execute("INSERT INTO items (id) VALUES (:id)", {"id": value})
    assert _ids(store) == sorted(["b", "B", "a_b", "ab", "a-c", "é"])  # Python's order is code point order


def test_concurrent_threads_read_then_write_safely(store):
    """Eight threads append numbered events the way job events are numbered (MAX + 1 in a transaction)."""
    errors = []

    def append(k: str) -> None:
        try:
            for _ in range(15):
                with store.transaction():
                    row = store.query_one("SELECT COALESCE(MAX(seq), 0) AS s FROM events WHERE k = :k", {"k": k})
                    store.execute("INSERT INTO events (k, seq) VALUES (:k, :s)", {"k": k, "s": row["s"] + 1})
                store.query("SELECT * FROM events WHERE k = :k", {"k": k})  # reads outside transactions too
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=append, args=("shared" if i % 2 else f"own{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = [r["seq"] for r in store.query("SELECT seq FROM events WHERE k = 'shared' ORDER BY seq")]
    assert seqs == list(range(1, 61))


# -- Postgres only ----------------------------------------------------------------------------------------------

def test_translation_of_parameters_and_ddl():
    assert translate("SELECT a::text FROM t WHERE b = :b AND c = ':c' AND d LIKE '5%' /* :e % */") == \
        "SELECT a::text FROM t WHERE b = %(b)s AND c = ':c' AND d LIKE '5%%' /* :e %% */"
    assert translate("SELECT 10 % 3") == "SELECT 10 %% 3"
    assert translate("INSERT OR IGNORE INTO t (a) VALUES (:a)") == "INSERT INTO t (a) VALUES (%(a)s) ON CONFLICT DO NOTHING"
    ddl = translate("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL DEFAULT 'a,b', "
                    "at REAL, b BLOB, UNIQUE (text, at)) WITHOUT ROWID")
    assert ddl == ('CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, text TEXT COLLATE "C" '
                   "NOT NULL DEFAULT 'a,b', at DOUBLE PRECISION, b BYTEA, UNIQUE (text, at))")
    assert translate("ALTER TABLE jobs ADD COLUMN heartbeat_at REAL NOT NULL DEFAULT 0") == \
        "ALTER TABLE jobs ADD COLUMN heartbeat_at DOUBLE PRECISION NOT NULL DEFAULT 0"
    # Foreign keys wait for the end of the migration batch: SQLite lets a table name one created later.
    assert defer_foreign_keys("CREATE TABLE c (id TEXT PRIMARY KEY REFERENCES s(id) ON DELETE CASCADE, n INTEGER)") == (
        "CREATE TABLE c (id TEXT PRIMARY KEY, n INTEGER)",
        ["ALTER TABLE c ADD FOREIGN KEY (id) REFERENCES s(id) ON DELETE CASCADE"])


def test_rowid_alias_numbers_itself(postgres_dsn):
    db = PostgresMetadataStore(postgres_dsn)
    db.migrate([Migration("auto", 1, ("CREATE TABLE logs (id INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT)",))])
    db.execute("INSERT INTO logs (line) VALUES ('one')")
    db.execute("INSERT INTO logs (line) VALUES ('two')")
    assert db.query("SELECT id, line FROM logs ORDER BY id") == [{"id": 1, "line": "one"}, {"id": 2, "line": "two"}]
    db.close()


def _column_types(dsn: str) -> dict[tuple[str, str], str]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_name, column_name, data_type FROM information_schema.columns"
                            " WHERE table_schema = 'public'").fetchall()
    return {(t, c): d for t, c, d in rows}


def test_app_migrations_apply_once_and_are_idempotent(postgres_dsn):
    from persona.services.app import MIGRATIONS

    db = PostgresMetadataStore(postgres_dsn)
    applied = db.migrate(MIGRATIONS)
    assert sorted(applied) == sorted((m.component, m.version) for m in MIGRATIONS)
    assert db.migrate(MIGRATIONS) == []
    again = PostgresMetadataStore(postgres_dsn)  # a restart
    assert again.migrate(MIGRATIONS) == []
    assert again.query_one("SELECT COUNT(*) AS n FROM schema_migrations") == {"n": len(MIGRATIONS)}
    types = _column_types(postgres_dsn)
    assert types[("jobs", "created_at")] == "double precision"
    assert types[("concept_files", "size_bytes")] == "bigint"
    assert types[("captions", "text")] == "text"
    db.close()
    again.close()


def test_processes_starting_together_migrate_once(postgres_dsn):
    from persona.services.app import MIGRATIONS

    stores = [PostgresMetadataStore(postgres_dsn) for _ in range(3)]  # separate pools: separate sessions
    start = threading.Barrier(len(stores))
    results: list = [None] * len(stores)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = stores[i].migrate(MIGRATIONS)
        except Exception as e:  # pragma: no cover - asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, len(MIGRATIONS)], results
    for s in stores:
        s.close()


def test_bad_urls_name_the_setting_and_hide_the_password(postgres_server):
    secret = postgres_server.password
    with pytest.raises(FailedPrecondition) as caught:
        PostgresMetadataStore(f"postgresql:/persona:{secret}@127.0.0.1:1/x")  # one slash: not a URL libpq reads
    assert "PERSONA_DATABASE_URL" in caught.value.message and secret not in caught.value.message

    with pytest.raises(Unavailable) as caught:
        PostgresMetadataStore(postgres_server.dsn(password="wrong-" + secret))
    message = caught.value.message
    assert "PERSONA_DATABASE_URL" in message and "password authentication failed" in message and secret not in message

    with pytest.raises(Unavailable) as caught:
        PostgresMetadataStore(postgres_server.dsn("no_such_db"))
    assert "no_such_db" in caught.value.message and secret not in caught.value.message

    port = postgres_fixture._free_port()
    with pytest.raises(Unavailable) as caught:
        PostgresMetadataStore(f"postgresql://persona:{secret}@127.0.0.1:{port}/persona")
    assert f"127.0.0.1:{port}" in caught.value.message and secret not in caught.value.message
    assert "***" in caught.value.message

    with pytest.raises(InvalidSetting, match="PERSONA_DATABASE_URL"):
        RuntimeSettings(database_url=f"mysql://persona:{secret}@db/persona")
    assert secret not in repr(RuntimeSettings(database_url=postgres_server.dsn()))
    assert redact(postgres_server.dsn()) == f"postgresql://persona:***@127.0.0.1:{postgres_server.port}/postgres"


def test_open_metadata_errors_are_clean(postgres_server, tmp_path, monkeypatch):
    from persona.services.app import open_metadata

    port = postgres_fixture._free_port()
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"postgresql://persona:{postgres_server.password}@127.0.0.1:{port}/p")
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path))
    with pytest.raises(Unavailable, match="PERSONA_DATABASE_URL"):
        open_metadata(RuntimeSettings.from_env())
    assert not (tmp_path / "metadata.sqlite3").exists()


def test_a_lost_connection_is_unavailable_and_the_pool_recovers(postgres_dsn):
    import psycopg

    db = PostgresMetadataStore(postgres_dsn)
    db.migrate([TABLES])
    with pytest.raises(Unavailable, match="lost the connection"):
        with db.transaction():
            pid = db.query_one("SELECT pg_backend_pid() AS pid")["pid"]
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            db.query("SELECT 1 AS one")
    assert db.query_one("SELECT 1 AS one") == {"one": 1}  # a fresh connection
    db.close()


# -- one flow through the API with PERSONA_DATABASE_URL --------------------------------------------------------

def test_flow_through_the_api_keeps_metadata_in_postgres(start_app, client_for, dog_photos, postgres_dsn, tmp_path):
    import psycopg
    from psycopg.rows import dict_row

    from persona.v1 import caption_pb2, common_pb2, generate_pb2, subjects_pb2, train_pb2

    app = start_app(database_url=postgres_dsn)
    assert isinstance(app.db, PostgresMetadataStore)
    client = client_for("acme", app)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos[:2])]))
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1))
    assert client.wait_for_job(job.job_id, timeout_s=120).state == common_pb2.JOB_STATE_SUCCEEDED
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=2, resolution=32, learning_rate=1e-2, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept_id = job.params["concept_id"]
    [image] = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept_id, prompts=["a sks dog"], steps=2, seed=1, width=32, height=32))
    assert image.png.startswith(b"\x89PNG")

    with psycopg.connect(postgres_dsn, row_factory=dict_row) as conn:
        def one(sql, *args):
            return conn.execute(sql, args).fetchone()

        assert one("SELECT tenant_id, class_name FROM subjects WHERE subject_id = %s", subject.subject_id) == {
            "tenant_id": "acme", "class_name": "dog"}
        assert one("SELECT COUNT(*) AS n FROM subject_images WHERE subject_id = %s", subject.subject_id)["n"] == 2
        assert [r["text"] for r in conn.execute("SELECT text FROM captions WHERE subject_id = %s",
                                                (subject.subject_id,))] == ["a photo of a sks dog"] * 2
        assert one("SELECT state, steps_done FROM concepts WHERE concept_id = %s", concept_id) == {
            "state": "READY", "steps_done": 2}
        assert one("SELECT COUNT(*) AS n FROM concept_files WHERE concept_id = %s", concept_id)["n"] >= 1
        states = {r["kind"]: r["state"] for r in conn.execute("SELECT kind, state FROM jobs")}
        assert set(states.values()) == {"SUCCEEDED"} and len(states) == 2
        assert one("SELECT COUNT(*) AS n FROM job_events WHERE job_id = %s", job.job_id)["n"] >= 3
        assert one("SELECT COUNT(*) AS n FROM api_keys WHERE tenant_id = 'acme'")["n"] == 1
    assert not (app.settings.data_dir / "metadata.sqlite3").exists()

    # Another process on the same database sees it all: a bare store, and a second server with its own data dir.
    other = PostgresMetadataStore(postgres_dsn)
    assert other.query_one("SELECT state FROM concepts WHERE concept_id = :c", {"c": concept_id}) == {"state": "READY"}
    other.close()
    second = start_app(data_dir=tmp_path / "second", database_url=postgres_dsn)
    listed = client_for("acme", second).subjects.ListSubjects(subjects_pb2.ListSubjectsRequest())
    assert [s.subject_id for s in listed.subjects] == [subject.subject_id]
    for server in (app, second):
        server.stop(0)
        server.db.close()
