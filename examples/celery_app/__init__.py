"""An example Celery app using celery-dlock: see tasks.py, and demo.py to run it end to end."""

from examples.celery_app.app import app

__all__ = ["app"]
