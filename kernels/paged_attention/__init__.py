"""Attention of new queries over a paged KV cache: per-row page tables, ragged key and query lengths, GQA."""
