"""specmatch: reproduction pipeline for Spectrum Matching (Ning et al., 2026)."""

__version__ = "0.1.0"
