"""tests.beat.app with Django set up, for ``celery_dlock.beat:LockedDatabaseScheduler``."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.beat.django_settings")
django.setup()

from tests.beat.app import app, record  # noqa: E402

__all__ = ["app", "record"]
