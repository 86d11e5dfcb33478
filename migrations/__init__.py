"""Alembic migrations of the registry schema (installed as `adapter_hub.migrations`)."""
