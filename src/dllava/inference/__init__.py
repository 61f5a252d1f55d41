"""Physically sparse inference: pruned prefill, sparse KV cache, generate, FLOPs accounting."""
