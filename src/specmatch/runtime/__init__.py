"""Runtime services shared by every stage: atomic IO, hashing, provenance."""
