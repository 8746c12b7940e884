"""`persona-cli keys create|list|rm`: API keys of a server's data dir, managed on that machine (no RPC)."""
from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Annotated, Iterator

import typer

from persona.services.runtime.auth import ApiKeyAuthenticator

from ..output import fail, note, table
from .session import DataDirOption, JsonOption, Session, session

app = typer.Typer(help="Create, list and revoke the API keys `persona-cli serve --auth api-key` accepts. "
                       "They are written straight into the data dir, on the server's machine.",
                  no_args_is_help=True, rich_markup_mode="markdown")

@contextlib.contextmanager
def authenticator(s: Session, data_dir: Path | None) -> Iterator[tuple[ApiKeyAuthenticator, Path]]:
    from persona.services.app import open_metadata

    if s.server:
        note("note: keys live in the server's data dir; --server / PERSONA_SERVER is not used here")
    settings = s.settings(data_dir)
    db = open_metadata(settings)
    try:
        yield ApiKeyAuthenticator(db, "api-key"), settings.data_dir
    finally:
        db.close()


def created(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M")


@app.command("create")
def create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant the key acts for: 1–63 lowercase letters, digits, - or _.",
                                          show_default=False)],
    name: Annotated[str, typer.Option(help="A note saying who or what uses the key.")] = "",
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key and print it; it is shown this once and only its hash is stored.

    Example: `export PERSONA_API_KEY=$(persona-cli keys create acme --name ci --data-dir /srv/persona)`
    """
    s = session(ctx)
    with authenticator(s, data_dir) as (auth, where):
        key_id, key = auth.create_key(tenant, name)
    record = {"key_id": key_id, "tenant_id": tenant, "name": name, "key": key}
    s.output(as_json).emit(record, lambda: key)
    note(f"created {key_id} for tenant {tenant} in {where}; the key above is shown only once: "
         "clients send it with --api-key or PERSONA_API_KEY")


@app.command("list")
def list_(ctx: typer.Context, data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """List API keys (ids, tenants, names; never the keys themselves).

    Example: `persona-cli keys list --data-dir /srv/persona`
    """
    s = session(ctx)
    with authenticator(s, data_dir) as (auth, where):
        keys = auth.list_keys()

    def render() -> str:
        return table(["KEY_ID", "TENANT", "NAME", "CREATED"],
                     [(k["key_id"], k["tenant_id"], k["name"], created(k["created_at"])) for k in keys])

    s.output(as_json).emit({"keys": keys}, render)
    if not keys:
        note(f"no API keys in {where}: create one with `persona-cli keys create TENANT`")


@app.command("rm")
def rm(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="Id of the key to revoke, e.g. key_3f2a….",
                                          show_default=False)],
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke an API key: calls made with it fail with UNAUTHENTICATED from then on.

    Example: `persona-cli keys rm key_3f2a… --data-dir /srv/persona`
    """
    s = session(ctx)
    with authenticator(s, data_dir) as (auth, where):
        if not auth.revoke(key_id):
            fail("NOT_FOUND", f"`key_id` {key_id!r} is not a key in {where}: list them with `persona-cli keys list`")
    s.output(as_json).emit({"key_id": key_id}, lambda: key_id)
