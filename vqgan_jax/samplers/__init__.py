"""Samplers of a trained stage-2 model: autoregressive (KV-cached, sliding window), MaskGIT's
iterative parallel decoding, and the classifier-free guidance schedules both use."""
