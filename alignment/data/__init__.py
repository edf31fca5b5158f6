"""Data pipeline: tokenizers, chat templates, datasets."""
