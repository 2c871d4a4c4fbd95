"""The top-level aggregators: the generation table and the paper report."""
