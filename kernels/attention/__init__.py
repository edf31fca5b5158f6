"""Causal attention with packing (segment ids), padding and grouped-query heads."""
