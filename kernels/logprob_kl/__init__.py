"""Output-head log-probs, entropy and top-K KL fused with the unembedding matmul (no [tokens, vocab])."""
