"""Flax NNX sublayers. Each takes ``(b, l, d_model)`` and returns the same shape."""
