"""The HTTP face of agentbus."""
