"""Edge-device side: encode private images with the first encoder; only latents leave (docs/spec.md §0)."""
