"""Django settings for the django-celery-beat scheduler tests (SQLite, one file per test)."""

from __future__ import annotations

import os

SECRET_KEY = "celery-dlock-tests-only"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DLOCK_TEST_DJANGO_DB", ":memory:"),
        "OPTIONS": {"timeout": 20},  # two beat processes share the file
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
