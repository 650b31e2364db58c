"""Celery integration of celery-dlock (requires ``pip install celery-dlock[celery]``)."""
