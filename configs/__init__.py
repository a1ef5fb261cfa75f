"""The run's configuration: one typed schema (schema.py), the recipe loader (load.py), the recipes (*.yaml)."""
