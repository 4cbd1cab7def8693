"""``psjobs.configure_ssh`` over the default session: apart from _api, so that a program that never
uses SSH does not import the SSH backend (and dataclasses, shlex, ...) with its first job."""

from __future__ import annotations

import functools
from typing import Any

from ._api import default_session
from .backends.ssh._backend import SSHOptions
from .backends.ssh._backend import configure_ssh as _configure_ssh
from .core._session import Session


@functools.wraps(_configure_ssh)
def configure_ssh(session: Session | None = None, **options: Any) -> SSHOptions:
    # The backend configures the session it is given; the default session lives here, in the face.
    return _configure_ssh(default_session() if session is None else session, **options)
