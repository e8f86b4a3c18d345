"""The `agentbus` command."""
