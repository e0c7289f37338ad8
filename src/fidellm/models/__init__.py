"""Model architectures: the shared Transformer blocks and the Llama-style decoder."""
