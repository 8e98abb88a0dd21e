"""What every command shares: exit codes, the usage error, table printing."""

from __future__ import annotations

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage; exits with status 2."""


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table of `rows` with the columns `cols` (missing values print empty)."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    sep = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


def rejects_table(rejects: list[dict], width: int) -> str:
    """The table of rejected files: name, code and the reason cut to `width` characters."""
    from pathlib import Path

    return table([{"file": Path(r["path"] or "?").name, "code": r["code"], "reason": (r["reason"] or "")[:width]}
                  for r in rejects], ["file", "code", "reason"])
