"""persona-cli command groups, one module each, joined to the root app in persona.client.cli."""
