"""Code shared by server and clients: configs, data, models, registries (SPEC §0)."""
