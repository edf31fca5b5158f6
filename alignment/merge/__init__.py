"""Model merging in weight space: methods on one tensor slice, per-tensor parameters, streaming checkpoint IO,
and mergekit YAML configurations run with mergekit's semantics."""
from alignment.merge.methods import METHODS, TensorParams
from alignment.merge.mergekit_yaml import load_mergekit_yaml
from alignment.merge.params import make_spec
from alignment.merge.streaming import merge_checkpoints

__all__ = ["METHODS", "TensorParams", "load_mergekit_yaml", "make_spec", "merge_checkpoints"]
