"""What the Celery layer needs of Celery, checked by behaviour when it is imported.

A locked task's body may be reached through ``Task.__call__`` (a direct call, or a
base class with a ``__call__`` of its own, even in a worker). Celery before 5.5 pushes an
empty request there (``Task.push_request`` does not start from the current one), so the
body would see no task id, no retries and no headers, and the lock could not tell a
worker run from a direct call. Those versions are refused with an error that says so.
"""

from __future__ import annotations

from typing import Any


def task_call_keeps_the_request(task_class: Any = None) -> bool:
    """Whether a request pushed inside a task call starts from the current request."""
    from celery.app.task import Task
    from celery.utils.threads import LocalStack

    probe = (task_class or Task)()
    probe.request_stack = LocalStack()
    probe.push_request(id="outer-request")
    probe.push_request(args=(), kwargs={})
    return bool(probe.request.id == "outer-request")


def check_celery() -> None:
    import celery

    if not task_call_keeps_the_request():
        raise ImportError(
            f"celery-dlock needs Celery 5.5 or later (installed: {celery.__version__}): before 5.5 a "
            "task's own __call__ runs the body with an empty request (no id, retries or headers)"
        )


check_celery()
