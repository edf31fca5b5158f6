"""Pure loss functions: loss(params, batch, rng) -> (sum, (count, metrics))."""
