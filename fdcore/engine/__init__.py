"""The fdcore inference engine: API server, batcher, paged KV cache, model runners."""
