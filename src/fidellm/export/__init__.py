"""Exporters to formats other tools load: Hugging Face directories (and later GGUF)."""
