"""The library's words in the core's messages, and the ``psjobs`` command's for them.

::

    core: "stop_job: Job 3 ... remove it later with remove_job(3, force=True)"
        --in_words("stop", ...)--> "stop: Job 3 ... remove it later with `psjobs remove --force 3`"

The host says its refusals in the command's words (handlers' ``worded``); the command says the
warnings a request raised in them too (``Client(words=in_words)``), while a connected Python
session shows those in the library's, which are its own. Standard library only: the command
imports it.
"""

from __future__ import annotations

import re

_HINTS = [(re.compile(r"list the session's jobs with get_job\(\)"), "list the jobs with `psjobs get`"),
          (re.compile(r"\bstop_job\((\d+)\)"), r"`psjobs stop \1`"),
          (re.compile(r"See job\.status_message; remove it later with remove_job\((\d+), force=True\)"),
           r"`psjobs get \1 --json` shows its status_message; remove it later with `psjobs remove --force \1`"),
          (re.compile(r"\bremove_job\((\d+), force=True\)"), r"`psjobs remove --force \1`"),
          (re.compile(r"\bremove_job\((\d+)\)"), r"`psjobs remove \1`"),
          (re.compile(r"pass force=True"), "pass --force"),
          (re.compile(r"\brestart_job\((\d+)\)"), r"`psjobs restart \1`"),
          (re.compile(r"make it(?: first)? with configure_group\('([\w.-]+)', parallel=N\)"),
           r"make it first with `psjobs group add \1 --parallel N`"),
          (re.compile(r"\b(parallel|retries) must\b"), r"--\1 must")]


def in_words(verb: str, message: str) -> str:
    """``message`` of the library said in the command's words: its verb (``stop:``, not
    ``stop_job:``) and the commands to run (``psjobs stop 3``, not stop_job(3))."""
    message = re.sub(r"^\w+: ", f"{verb}: ", message)
    for pattern, words in _HINTS:
        message = pattern.sub(words, message)
    return message
