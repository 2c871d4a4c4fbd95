"""Rendering shared by every stage that writes a figure or a table (deterministic PNGs, CSV and
Markdown tables). A leaf of the package: it imports no stage, so metrics, alignment and the
report all use it without importing one another."""
