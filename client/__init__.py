"""Edge-device side: encode private images with the first encoder; only latents leave (SPEC §0)."""
