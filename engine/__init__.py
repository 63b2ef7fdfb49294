"""Kestrel engine: continuous batching over a paged KV cache, native torch models."""
