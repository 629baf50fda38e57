"""Code shared by server and clients: configs, data, models, registries (docs/spec.md §0)."""
