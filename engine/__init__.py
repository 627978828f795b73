"""The model side of a replica: model, weights, tokenizer, paged attention, runner, engine core.

Kept free of imports here: `engine.protocol` and `engine.tokenizer` are used by the gateway, which
must not load torch.
"""
