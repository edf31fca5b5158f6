"""Evaluation: benchmark metrics, the judge client, generation caches, reports and charts."""
