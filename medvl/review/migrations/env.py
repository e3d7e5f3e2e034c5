"""Alembic's environment for the review store: migrations run on the connection the store
hands over (:func:`medvl.review.store.migrate`), online only."""

from alembic import context

from medvl.review.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
