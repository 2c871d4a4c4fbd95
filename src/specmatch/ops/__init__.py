"""Operations around the stages: DVC stages and metrics, dataset versioning, the container
definition check, the provenance audit, and the clone's layered environment (`layered_env`,
run by the Makefile before the package is installed; the Snakefile puts its venv first on
PATH). Nothing here is imported by a stage, except `lifeline`, which the CLI starts for every
command (a job stops when its Snakemake dies)."""
