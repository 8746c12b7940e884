"""PostgresMetadataStore: the MetadataStore interface on PostgreSQL (psycopg 3), for several persona processes.

It runs the services' SQL unchanged. What differs between the dialects is translated here, once per SQL string:

* parameters: `:name` becomes psycopg's `%(name)s`; `::` casts, quoted strings and identifiers and comments are
  left alone, and every literal `%` is doubled (psycopg reads `%` everywhere, even inside string literals);
* DDL of migrations, written for SQLite, gets Postgres column types with SQLite's meaning: INTEGER → BIGINT
  (SQLite integers are 64-bit), REAL/FLOAT/DOUBLE → DOUBLE PRECISION (timestamps are time.time() floats; Postgres
  REAL is 4 bytes), BLOB → BYTEA, TEXT → TEXT COLLATE "C" (SQLite compares text byte-wise: same ORDER BY and
  keyset pagination whatever the database's locale), `INTEGER PRIMARY KEY [AUTOINCREMENT]` → an identity column;
  `WITHOUT ROWID` and `STRICT` table options are dropped;
* `INSERT OR IGNORE INTO …` becomes `INSERT INTO … ON CONFLICT DO NOTHING`;
* values: Python bools are sent as 0/1 (SQLite stores them so, and persona's flag columns are INTEGER); NUMERIC
  results (SUM of integers, AVG) come back as int when whole, else float, never Decimal; BYTEA comes back as bytes.

Semantics mirror SQLiteMetadataStore:

* `transaction()` is re-entrant per thread: inner blocks join the outermost one, which commits or rolls back.
  Every outermost transaction first takes one Postgres advisory lock (`pg_advisory_xact_lock`), as SQLite's
  `BEGIN IMMEDIATE` takes the database's write lock: transactions of all processes and threads run one at a time,
  so read-then-write code (e.g. the next job event `sequence` from MAX()+1) stays correct. Statements outside a
  transaction run on their own in autocommit and do not wait for it (readers never block, as in WAL mode).
* Connections come from a psycopg_pool pool (`max_connections`, default 16): a transaction keeps one connection
  for its thread until it ends; a statement outside a transaction borrows one for itself. Persona's ~32 RPC and
  job threads share them; a thread waits up to `pool_timeout_s` for a free one.
* `migrate` applies the missing migrations in one transaction holding a second advisory lock, so processes that
  start together migrate once: the others wait, then find them applied. Foreign keys (`REFERENCES`) are added
  at the end of the batch: SQLite accepts a reference to a table a later migration creates, Postgres does not,
  and migrations run in (component, version) order ("captions" before "subjects").

Differences that remain: a statement that fails inside a transaction aborts the whole Postgres transaction, where
SQLite would let the block go on; and SQL errors are psycopg's (psycopg.errors.UniqueViolation, …), not sqlite3's.
Persona never catches database errors.

Connection problems surface as the project's errors, naming the setting and never printing the password:
a DSN that does not parse → FailedPrecondition; a server that refuses or cannot be reached, a lost connection,
no free connection within `pool_timeout_s` or a lock wait over `lock_timeout_s` → Unavailable.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from .errors import FailedPrecondition, Unavailable
from .metadata import MetadataStore, Migration, Row

# Advisory lock keys (any two bigints nobody else uses): 0x70657273 = "pers".
TRANSACTION_LOCK = 0x70657273_00000001
MIGRATION_LOCK = 0x70657273_00000002

INSTALL_HINT = "install the driver with `pip install 'persona[postgres]'` (psycopg 3 and psycopg_pool)"

_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at REAL NOT NULL,"
    " PRIMARY KEY (component, version))"
)


# -- SQL translation --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<string>'(?:[^']|'')*')             # 'string literal' ('' escapes a quote)
  | (?P<ident>"(?:[^"]|"")*")              # "quoted identifier"
  | (?P<line_comment>--[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<cast>::)                           # Postgres cast, not a parameter
  | :(?P<param>[A-Za-z_][A-Za-z0-9_]*)     # :name
  | (?P<percent>%)
""", re.VERBOSE | re.DOTALL)

_INSERT_OR_IGNORE = re.compile(r"^(\s*)INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_CREATE_TABLE = re.compile(r"^\s*CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TABLE\b", re.IGNORECASE)
_ADD_COLUMN = re.compile(r"^(\s*ALTER\s+TABLE\s+.+?\s+ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?)(.*)$",
                         re.IGNORECASE | re.DOTALL)
_TABLE_CONSTRAINT = re.compile(r"^\s*(CONSTRAINT|PRIMARY|UNIQUE|FOREIGN|CHECK|EXCLUDE)\b", re.IGNORECASE)
_CONSTRAINT_WORDS = ("CONSTRAINT", "PRIMARY", "NOT", "NULL", "UNIQUE", "CHECK", "DEFAULT", "COLLATE", "REFERENCES",
                     "GENERATED", "AS", "ON")
_COLUMN = re.compile(r"""
    ^(?P<lead>\s*(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)\s+)          # the column name
    (?P<type>[A-Za-z_]+(?:\s+(?!(?:%s)\b)[A-Za-z_]+)*(?:\s*\([^)]*\))?)  # its type, e.g. DOUBLE PRECISION, VARCHAR(8)
    (?P<rest>.*)$""" % "|".join(_CONSTRAINT_WORDS), re.VERBOSE | re.DOTALL | re.IGNORECASE)
_AUTOINCREMENT = re.compile(r"\s+AUTOINCREMENT\b", re.IGNORECASE)
_PRIMARY_KEY = re.compile(r"\bPRIMARY\s+KEY\b", re.IGNORECASE)
_TABLE_OPTIONS = re.compile(r"\)\s*((?:WITHOUT\s+ROWID|STRICT)(?:\s*,\s*(?:WITHOUT\s+ROWID|STRICT))*)\s*$",
                            re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """A statement of the services' dialect (SQLite, `:name` parameters) as psycopg runs it on Postgres."""
    if _CREATE_TABLE.match(sql):
        sql = _translate_create_table(sql)
    else:
        add = _ADD_COLUMN.match(sql)
        if add and not _TABLE_CONSTRAINT.match(add.group(2)):
            sql = add.group(1) + _translate_column(add.group(2))
    ignore = _INSERT_OR_IGNORE.match(sql)
    if ignore:
        sql = _INSERT_OR_IGNORE.sub(r"\1INSERT INTO", sql, count=1)
        if not re.search(r"\bON\s+CONFLICT\b", _code_only(sql), re.IGNORECASE):
            sql = sql.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return _TOKEN.sub(_placeholder, sql)


def _placeholder(match: re.Match) -> str:
    kind = match.lastgroup
    if kind == "param":
        return f"%({match.group('param')})s"
    if kind == "percent":
        return "%%"
    if kind == "cast":
        return "::"
    return match.group(0).replace("%", "%%")  # literals, quoted identifiers, comments


def _code_only(sql: str) -> str:
    """`sql` with string literals, quoted identifiers and comments blanked out (for keyword searches)."""
    return _TOKEN.sub(lambda m: " " if m.lastgroup in ("string", "ident", "line_comment", "block_comment")
                      else m.group(0), sql)


def _split_top_level(body: str) -> list[str]:
    """Splits a column list at the commas outside parentheses and quotes."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        c = body[i]
        if c in "'\"":
            end = body.find(c, i + 1)
            while end != -1 and end + 1 < len(body) and body[end + 1] == c:  # doubled quote: escaped
                end = body.find(c, end + 2)
            i = len(body) if end == -1 else end + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
        i += 1
    parts.append(body[start:])
    return parts


def _translate_create_table(sql: str) -> str:
    open_at, close_at = sql.find("("), sql.rfind(")")
    if open_at == -1 or close_at < open_at:
        return sql  # CREATE TABLE … AS SELECT: nothing to translate
    head, body, tail = sql[:open_at + 1], sql[open_at + 1:close_at], sql[close_at:]
    tail = _TABLE_OPTIONS.sub(")", tail)
    columns = [part if _TABLE_CONSTRAINT.match(part) else _translate_column(part) for part in _split_top_level(body)]
    return head + ",".join(columns) + tail


_TABLE_NAME = re.compile(r"^\s*CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                         r"(\"(?:[^\"]|\"\")*\"|[A-Za-z_][A-Za-z0-9_$.]*)", re.IGNORECASE)
_REFERENCES = re.compile(r"""\s+REFERENCES\s+(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$.]*)\s*(?:\([^)]*\))?
    (?:\s+(?:ON\s+(?:DELETE|UPDATE)\s+(?:CASCADE|RESTRICT|NO\s+ACTION|SET\s+NULL|SET\s+DEFAULT)
         |MATCH\s+\w+|NOT\s+DEFERRABLE|DEFERRABLE|INITIALLY\s+(?:DEFERRED|IMMEDIATE)))*""",
                         re.IGNORECASE | re.VERBOSE)
_FOREIGN_KEY = re.compile(r"^\s*(?:CONSTRAINT\s+\S+\s+)?FOREIGN\s+KEY\b", re.IGNORECASE)


def defer_foreign_keys(sql: str) -> tuple[str, list[str]]:
    """Splits the foreign keys off a CREATE TABLE: (the statement without them, ALTER TABLE … ADD FOREIGN KEY …).

    SQLite accepts a REFERENCES to a table created later (it checks foreign keys only when rows change), and
    migrations run in (component, version) order, so "captions" may name "subject_images" before "subjects"
    creates it. `migrate` adds the foreign keys after every table of its batch exists.
    """
    table = _TABLE_NAME.match(sql)
    if not table:
        return sql, []
    open_at, close_at = sql.find("("), sql.rfind(")")
    if open_at == -1 or close_at < open_at:
        return sql, []
    kept, deferred = [], []
    for part in _split_top_level(sql[open_at + 1:close_at]):
        if _FOREIGN_KEY.match(part):
            deferred.append(f"ALTER TABLE {table.group(1)} ADD {part.strip()}")
            continue
        reference = None if _TABLE_CONSTRAINT.match(part) else _REFERENCES.search(part)
        if reference:
            column = part.split(None, 1)[0]
            deferred.append(f"ALTER TABLE {table.group(1)} ADD FOREIGN KEY ({column}){reference.group(0)}")
            part = part[:reference.start()] + part[reference.end():]
        kept.append(part)
    return sql[:open_at + 1] + ",".join(kept) + sql[close_at:], deferred


def _translate_column(definition: str) -> str:
    match = _COLUMN.match(definition)
    if not match:
        return definition  # a column without a type: left as is
    lead, declared, rest = match.group("lead"), match.group("type"), match.group("rest")
    name = " ".join(declared.upper().split())
    if name in ("INTEGER", "INT") and _PRIMARY_KEY.search(rest):
        # SQLite's rowid alias: numbered automatically when the insert leaves it out.
        return lead + "BIGINT GENERATED BY DEFAULT AS IDENTITY" + _AUTOINCREMENT.sub("", rest)
    base = name.split("(")[0].strip()
    if base in ("INTEGER", "INT", "BIGINT", "INT8", "MEDIUMINT", "UNSIGNED BIG INT"):
        pg = "BIGINT"
    elif base in ("REAL", "FLOAT", "DOUBLE", "DOUBLE PRECISION"):
        pg = "DOUBLE PRECISION"
    elif base == "BLOB":
        pg = "BYTEA"
    elif base == "TEXT" and not re.search(r"\bCOLLATE\b", rest, re.IGNORECASE):
        pg = 'TEXT COLLATE "C"'
    else:
        pg = declared
    return lead + pg + rest


# -- values -----------------------------------------------------------------------------------------------------

def _params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    # Always a dict, even empty: psycopg then reads `%%` as `%` in every statement.
    return {k: int(v) if isinstance(v, bool) else v for k, v in (params or {}).items()}


def _rows(cursor) -> list[Row]:
    if cursor.description is None:
        return []
    return [{k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()} for row in cursor.fetchall()]


def _configure_types(adapters) -> None:
    """NUMERIC (SUM of BIGINT, AVG) loads as int when whole, else float: SQLite never returns Decimal."""
    from psycopg.adapt import Loader

    class NumericAsNumber(Loader):
        def load(self, data):
            text = bytes(data).decode()
            try:
                return int(text)  # SUM(BIGINT), whole NUMERIC values
            except ValueError:
                return float(text)  # AVG, fractions, NaN

    adapters.register_loader("numeric", NumericAsNumber)


# -- DSN handling -----------------------------------------------------------------------------------------------

# The password of a URL (scheme://user:PASSWORD@…, also when the URL does not parse) and of `password=…` (key=value
# DSNs, ?password= parameters): group 1 is what comes before it, group 2 the password.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/*[^:@/\s]*:)([^@\s]*)@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)

def redact(dsn: str) -> str:
    """The DSN with its password replaced by ***, for messages and logs."""
    text = dsn
    if "://" in text:
        try:
            parts = urlsplit(text)
            if parts.password is not None:
                userinfo, _, hostinfo = parts.netloc.rpartition("@")
                user = userinfo.split(":", 1)[0]
                text = parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()
        except ValueError:
            pass
    # Malformed URLs, key=value DSNs and ?password= parameters.
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _KEYWORD_PASSWORD.sub(r"\1***", text)
    return text


def _passwords(dsn: str) -> list[str]:
    found = [m.group(2) for m in _URL_PASSWORD.finditer(dsn)]
    found += [m.group(2).strip("'") for m in _KEYWORD_PASSWORD.finditer(dsn)]
    try:
        from urllib.parse import unquote

        password = urlsplit(dsn).password
        if password:
            found += [password, unquote(password)]
    except ValueError:
        pass
    return sorted({p for p in found if p}, key=len, reverse=True)


# -- the store --------------------------------------------------------------------------------------------------

class PostgresMetadataStore(MetadataStore):
    """Metadata on a PostgreSQL server (psycopg 3), shared by every persona process pointed at it.

    `lock_timeout_s` bounds every wait for a lock (the transaction lock included), as SQLite's busy timeout does.
    """

    shared_between_processes = True

    def __init__(self, dsn: str, *, max_connections: int = 16, connect_timeout_s: float = 10.0,
                 pool_timeout_s: float = 30.0, lock_timeout_s: float = 30.0, setting: str = "PERSONA_DATABASE_URL"):
        self.setting = setting
        self._lock_timeout_s = lock_timeout_s
        self._dsn = dsn
        self._where = f"{setting}={redact(dsn)}"
        self._secrets = _passwords(dsn)
        self._pool_timeout_s = pool_timeout_s
        self._local = threading.local()
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as e:
            raise FailedPrecondition(f"{setting} is set but the PostgreSQL driver is missing ({e.name}): "
                                     f"{INSTALL_HINT}, or unset {setting} to keep metadata in SQLite") from None
        self._psycopg = psycopg
        self._dict_row = psycopg.rows.dict_row
        try:
            options = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            raise FailedPrecondition(
                f"{setting} is not a PostgreSQL connection URL ({self._scrub(str(e))}): set it to e.g. "
                "postgresql://USER:PASSWORD@HOST:5432/DATABASE, or leave it empty for SQLite in the data dir") from None
        # No server-side prepared statements: they break behind PgBouncer in transaction mode, and persona's
        # metadata statements are few and small.
        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        if "connect_timeout" not in options:
            kwargs["connect_timeout"] = max(1, int(connect_timeout_s))
        if "application_name" not in options:
            kwargs["application_name"] = "persona"
        # One connection first, in the foreground: its error says why (refused, password, no such database),
        # where the pool would only time out.
        try:
            psycopg.connect(dsn, **kwargs).close()
        except psycopg.Error as e:
            raise Unavailable(f"cannot connect to the metadata database {self._where} ({self._reason(e)}): check "
                              f"that the server is up and reachable and that {setting} names the right host, port, "
                              "user, password and database") from None
        self._pool = ConnectionPool(dsn, kwargs=kwargs, min_size=1, max_size=max(1, max_connections),
                                    timeout=pool_timeout_s, configure=self._configure,
                                    check=ConnectionPool.check_connection, name="persona-metadata", open=True)

    # -- MetadataStore

    def migrate(self, migrations: Sequence[Migration]) -> list[tuple[str, int]]:
        applied = []
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(:key)", {"key": MIGRATION_LOCK})
            self.execute(_SCHEMA_MIGRATIONS)
            done = {(r["component"], r["version"]) for r in self.query("SELECT component, version FROM schema_migrations")}
            foreign_keys: list[str] = []
            for m in sorted(migrations, key=lambda m: (m.component, m.version)):
                if (m.component, m.version) in done:
                    continue
                for statement in m.statements:
                    statement, deferred = defer_foreign_keys(statement)
                    self.execute(statement)
                    foreign_keys += deferred
                self.execute(
                    "INSERT INTO schema_migrations (component, version, applied_at) VALUES (:c, :v, :t)",
                    {"c": m.component, "v": m.version, "t": time.time()},
                )
                applied.append((m.component, m.version))
            for statement in foreign_keys:
                self.execute(statement)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[None]:
        local = self._local
        if getattr(local, "conn", None) is not None:  # joins the outer transaction of this thread
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        with self._errors(), self._pool.connection() as conn:
            local.conn, local.depth = conn, 1
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (TRANSACTION_LOCK,))
                    yield
            finally:
                local.conn, local.depth = None, 0

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        with self._errors(), self._connection() as conn, conn.cursor() as cursor:
            cursor.execute(translate(sql), _params(params))
            return cursor.rowcount

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with self._errors(), self._connection() as conn, conn.cursor(row_factory=self._dict_row) as cursor:
            cursor.execute(translate(sql), _params(params))
            return _rows(cursor)

    def close(self) -> None:
        self._pool.close()

    # -- helpers

    def _configure(self, conn) -> None:
        """Runs once on every new pooled connection."""
        _configure_types(conn.adapters)
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self._lock_timeout_s * 1000)}ms",))

    @contextmanager
    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
        else:
            with self._pool.connection() as conn:
                yield conn

    @contextmanager
    def _errors(self):
        """Connection failures as Unavailable naming the setting; SQL errors pass through unchanged."""
        from psycopg_pool import PoolTimeout

        try:
            yield
        except PoolTimeout:
            raise Unavailable(f"no connection to the metadata database {self._where} within {self._pool_timeout_s:g} s:"
                              " the server is unreachable or every pooled connection is busy") from None
        except self._psycopg.OperationalError as e:
            sqlstate = getattr(e, "sqlstate", None) or ""
            if sqlstate == "55P03":  # lock_not_available
                raise Unavailable(f"the metadata database {self._where} is busy: a lock was held longer than "
                                  f"{self._lock_timeout_s:g} s ({self._reason(e)}); try again") from None
            if sqlstate and not sqlstate.startswith(("08", "57P")):
                raise  # lock timeouts, deadlocks, …: the statement's own failure
            raise Unavailable(f"lost the connection to the metadata database {self._where}: {self._reason(e)}") from None

    def _reason(self, error: Exception) -> str:
        return self._scrub(" ".join(str(error).split()).rstrip(".") or type(error).__name__)

    def _scrub(self, text: str) -> str:
        text = text.replace(self._dsn, redact(self._dsn))
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
