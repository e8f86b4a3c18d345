"""The domain: one module per aggregate, each a decider (`initial_state`, `evolve`, `decide`).
Pure functions: no NATS, SQL or HTTP in here."""
