"""Model definitions (diffusers config-built models; SPEC §1) and students (issue 2 §5)."""
