"""Built-in scenarios (registered through this project's own entry points)."""
