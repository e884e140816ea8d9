"""The store: SQLAlchemy 2 Core over SQLite (embedded default, WAL) or PostgreSQL.

Tables live in modules next to the code that owns them, all on the one `metadata` in
`gateway.store.metadata`; Alembic migrations in `gateway/store/migrations` create them.
"""
