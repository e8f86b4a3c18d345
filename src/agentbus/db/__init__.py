"""Postgres: the engine for read models and the migrations that shape them."""
