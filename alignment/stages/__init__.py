"""Stages wire data, a loss and the training loop together; one module per stage."""
