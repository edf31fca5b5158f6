"""Model merging in weight space: methods on one tensor slice, per-tensor parameters, streaming checkpoint IO."""
from alignment.merge.methods import METHODS, TensorParams
from alignment.merge.params import make_spec
from alignment.merge.streaming import merge_checkpoints

__all__ = ["METHODS", "TensorParams", "make_spec", "merge_checkpoints"]
