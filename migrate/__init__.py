"""uffd-migrate: postcopy live migration over userfaultfd, with no per-page state."""

__version__ = "0.1.0"
