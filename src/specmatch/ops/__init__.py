"""Operations around the stages: DVC stages and metrics, dataset versioning, the container
definition check, and the provenance audit. Nothing here is imported by a stage."""
