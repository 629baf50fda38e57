"""Server side: pretraining, condensation, student training, reports, ServerApp (SPEC §1, §6)."""
