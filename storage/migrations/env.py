"""Alembic environment for stratafit (configured programmatically, see storage.migrate).

The caller passes an open SQLAlchemy connection in ``config.attributes["connection"]``
(this is what :meth:`storage.store.Store.upgrade` does, inside its own transaction and,
on PostgreSQL, under an advisory lock). Without one, ``sqlalchemy.url`` is used.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from storage.models import FiniteFloat, UTCDateTime, metadata

config = context.config


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render the models' TypeDecorators as their plain column types in revisions."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, FiniteFloat):
        return "sa.Double()"
    return False


_OPTIONS: dict[str, Any] = {
    "target_metadata": metadata,
    "render_as_batch": True,
    "compare_type": True,
    "render_item": _render_item,
}


def run_migrations_offline() -> None:
    """Emit SQL to stdout for ``sqlalchemy.url`` without connecting."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on the given connection, or on a new one to ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
