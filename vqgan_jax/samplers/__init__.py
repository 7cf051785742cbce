"""Samplers of a trained stage-2 model: autoregressive (KV-cached, sliding window)."""
