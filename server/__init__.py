"""Server side: pretraining, condensation, student training, reports, ServerApp (docs/spec.md §1, §6)."""
