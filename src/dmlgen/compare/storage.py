"""Optuna study storage: any database URL Optuna accepts (SQLite by default), with clear errors.

Several machines can share one search by giving all of them the same server URL (PostgreSQL, MySQL);
each trial is claimed in the database, so none runs twice. Trials of a process that died stay RUNNING
until their heartbeat is older than :data:`GRACE_SECONDS`; then the next process marks them failed and
``dmlgen compare --resume`` queues their parameters again.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from dmlgen.errors import ConfigError

__all__ = ["GRACE_SECONDS", "HEARTBEAT_SECONDS", "display_url", "open_storage"]

HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
# Seconds to wait for a database server before giving up (PostgreSQL / MySQL drivers).
CONNECT_TIMEOUT = 10


def display_url(url: str) -> str:
    """The URL with its password (``user:secret@host``) replaced by ``***``, fit for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _engine_kwargs(url: str) -> dict[str, Any]:
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    if scheme.startswith("sqlite"):
        # Long trials write rarely, but two processes may write at once: wait for the lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    return {}


def open_storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` on ``url`` with trial heartbeats.

    Raises ConfigError naming the URL (password hidden) when it is not a database URL, when its driver is
    not installed, or when the database cannot be reached or opened.
    """
    import optuna
    import sqlalchemy.exc

    shown = display_url(url)
    if "://" not in url:
        raise ConfigError(f"storage: {shown!r} is not a database URL (e.g. sqlite:///runs/compare/optuna.db or "
                          "postgresql://user:password@host/db)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is flagged experimental by Optuna
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                                              heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    except ImportError as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"storage {shown}: the Python driver of this database is not installed ({cause}); "
                          "install it (e.g. psycopg for postgresql://, PyMySQL with mysql+pymysql://)") from None
    except sqlalchemy.exc.NoSuchModuleError as exc:
        raise ConfigError(f"storage {shown}: unknown database kind ({exc})") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(f"storage {shown}: not a database URL that SQLAlchemy / Optuna accepts ({exc})") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"storage {shown}: cannot open or reach the database: {reason}") from None
