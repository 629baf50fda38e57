"""Model definitions (diffusers config-built models; docs/spec.md §1) and students."""
