"""Executors: what actually runs an agent's turn (echo, an OpenAI-compatible API, an HTTP
service, a child process). One module each, behind the `Executor` protocol."""
