"""Conversion between vqgan_jax workdirs and other projects' checkpoints (taming.py)."""
