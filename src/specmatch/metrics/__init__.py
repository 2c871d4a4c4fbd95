"""Metrics: spectral statistics now; FID and reconstruction metrics follow."""
