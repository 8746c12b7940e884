"""Keyset pagination over (created_at, id), newest first, with opaque page tokens."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class Page:
    size: int
    after: tuple[float, str] | None  # (created_at, id) of the last item of the previous page


def parse_page(page_size: int, page_token: str) -> Page:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"`page.page_size` is {page_size}: use 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
    after = None
    if page_token:
        try:
            created_at, item_id = json.loads(base64.urlsafe_b64decode(page_token.encode()))
            after = (float(created_at), str(item_id))
        except Exception:
            raise InvalidArgument("`page.page_token` is not a token this server issued: pass the previous "
                                  "response's `next_page_token`, or empty for the first page") from None
    return Page(size=page_size or DEFAULT_PAGE_SIZE, after=after)


def next_token(rows: list[dict], page: Page, id_column: str) -> str:
    """Token for the page after `rows` (fetched with LIMIT size + 1), or "" when it was the last."""
    if len(rows) <= page.size:
        return ""
    last = rows[page.size - 1]
    return base64.urlsafe_b64encode(json.dumps([last["created_at"], last[id_column]]).encode()).decode()


def keyset_clause(page: Page, id_column: str) -> tuple[str, dict]:
    """SQL condition and parameters selecting the rows after the page token (newest first)."""
    if page.after is None:
        return "1=1", {}
    return (f"(created_at < :after_ts OR (created_at = :after_ts AND {id_column} < :after_id))",
            {"after_ts": page.after[0], "after_id": page.after[1]})
