"""Projections: the one runtime that turns EVENTS into Postgres read models, and the read
models themselves (one module each)."""
