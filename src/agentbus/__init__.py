"""agentbus: an event-sourced message bus for AI-agent gateways."""

__version__ = "0.1.0"
