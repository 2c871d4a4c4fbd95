"""Datasets: the embedded default, image folders, ImageNet, and their uint8 shards."""
