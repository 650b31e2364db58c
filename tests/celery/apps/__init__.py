"""Celery apps run by real worker subprocesses in the tests (one app per test module)."""
