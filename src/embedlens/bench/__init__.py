"""Measurement: FLOP accounting and prefill latency."""
