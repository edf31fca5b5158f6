"""The training machinery shared by every stage: state, optimizer, jitted step, loop, metrics."""
