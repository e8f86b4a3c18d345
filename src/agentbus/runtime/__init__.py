"""The embedded runtime: real nats-server and Postgres processes started by agentbus itself."""
