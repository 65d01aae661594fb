"""recycler: recycle fine-tuning across base-model releases (Lin et al., 2025, arXiv 2503.20110)."""

__version__ = "0.1.0"
