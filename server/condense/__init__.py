"""Stage 2, condensation: pretraining (autoencoder, E2 + chain), committed checkpoints, selection rules,
the chain itself with teacher guidance, latent refinement by distribution matching, multi-image formation."""
