"""A toy model family on which the paper's fine-tuning-transfer effects are visible on a 2-core CPU."""

from recycler.toy.family import ProgressUpdate, ToyFamily, build_toy_family

__all__ = ["ProgressUpdate", "ToyFamily", "build_toy_family"]
