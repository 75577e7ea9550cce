"""The model runners, one room each behind :mod:`fdcore.engine.runner`: ``torch`` (real
Llama-family decoders) and ``sim`` (a cost model for tests and benchmarks)."""
