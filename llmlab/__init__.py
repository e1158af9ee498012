"""llmlab: make your own chat assistant end to end, from tokenizer to serving, on a laptop or on GPUs."""

__version__ = "0.1.0"
