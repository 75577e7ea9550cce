"""The ``sim`` model runner: a cost model over a hash "KV cache", with a byte tokenizer.

Nothing is re-exported here, so that importing the byte tokenizer alone does not import torch.
"""
