"""Exceptions that mean "your input is wrong": shown as one line with exit status 2, never a traceback."""

from __future__ import annotations

from .builder.errors import CheckpointError
from .runtime.errors import CapacityError, DeviceError, RequestError

USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, CapacityError, RequestError, DeviceError)
