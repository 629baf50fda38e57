"""Stage 1, the federation: the Flower ServerApp, the collection of sealed latents and its intake, the
pool with provenance, the privacy ledger, certificates and the fleet-only gateway."""
