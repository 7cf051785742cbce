"""Flax (linen) models: autoencoder, discriminators, LPIPS."""
