"""fidel-lm: Amharic text to small, honestly measured language models."""

__version__ = "0.1.0"
