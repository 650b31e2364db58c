"""celery-dlock benchmark suite (see benchmarks/README.md)."""
