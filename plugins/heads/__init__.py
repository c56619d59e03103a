"""Built-in task heads (registered through this project's own entry points)."""
