"""Which jobs a verb means: ids, names with wildcards, instance ids, Job objects, and Get-Job's filters.

The one implementation of selection: the Session's verbs, the session host and the faces all go
through it, so `newest`, wildcards and the not-found messages mean the same everywhere. Pure: it
reads the tables it is given (under the caller's lock) and changes nothing.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .._errors import JobNotFoundError
from ._format import JobList
from ._job import Job
from ._state import JobState


def select_jobs(top: Mapping[int, Job], every: Mapping[int, Job], session: object, *, id: Any = None,
                name: str | Iterable[str] | None = None, instance_id: Any = None,
                state: JobState | str | None = None, command: str | Iterable[str] | None = None,
                has_more_data: bool | None = None, before: datetime | None = None,
                after: datetime | None = None, newest: int | None = None, include_child_jobs: bool = False,
                child_job_state: JobState | str | None = None) -> JobList:
    """Get-Job: ``top`` (top-level jobs by id) and ``every`` (children too) filtered, by ascending id."""
    want_state = JobState.parse(state) if state is not None else None
    want_child = JobState.parse(child_job_state) if child_job_state is not None else None
    if newest is not None and (isinstance(newest, bool) or not isinstance(newest, int) or newest < 0):
        raise ValueError(f"get_job: newest must be a whole number >= 0, not {newest!r}")
    b = _as_timestamp("before", before)
    a = _as_timestamp("after", after)
    if id is None and name is None and instance_id is None:
        if state is None and command is None and has_more_data is None and before is None \
                and after is None and newest is None and not include_child_jobs and child_job_state is None:
            # The table is in id order already. One pass over it: a list() then a JobList() copy
            # touched every Job three times (two increfs, one decref), a cache miss each over
            # 100,000 finished jobs (get_job() 1.0 -> 1.9 ms once jobs grew).
            return JobList(top.values())
        jobs = list(top.values())
    else:
        jobs = []
        if id is not None:
            jobs += resolve(every, session, id, "get_job")
        if name is not None:
            jobs += by_names(every, _strings("name", name), "get_job")
        if instance_id is not None:
            jobs += resolve(every, session, _uuids(instance_id), "get_job")
    if want_state is not None:
        jobs = [j for j in jobs if j.state is want_state]
    if command is not None:
        pats = [_wildcard(c.strip()) for c in _strings("command", command)]
        jobs = [j for j in jobs if any(p.fullmatch(j.command.strip()) for p in pats)]
    if want_child is not None or include_child_jobs:
        extra = [c for j in jobs for c in j.child_jobs if want_child is None or c.state is want_child]
        jobs = jobs + extra
    if has_more_data is not None:
        jobs = [j for j in jobs if j.has_more_data == bool(has_more_data)]
    if b is not None:
        jobs = [j for j in jobs if j._end is not None and j._end < b]
    if a is not None:
        jobs = [j for j in jobs if j._end is not None and j._end > a]
    if newest is not None:
        # Unfinished jobs count as the newest: their end is still to come.
        jobs.sort(key=lambda j: j._end if j._end is not None else float("inf"), reverse=True)
        jobs = jobs[:newest]
    return JobList(sorted(unique(jobs), key=lambda j: j.id))


def resolve(every: Mapping[int, Job], session: object, jobs: Any, verb: str) -> list[Job]:
    """The jobs a verb's ``jobs`` argument names, each once, in the order given; raises when one is missing."""
    out: list[Job] = []
    if type(jobs) is Job and jobs._session is session and every.get(jobs.id) is jobs:
        return [jobs]  # one Job of this session: the thread path's receive, wait and remove
    items = [jobs] if isinstance(jobs, (Job, int, str, uuid.UUID)) else jobs
    if not isinstance(items, Iterable):
        raise TypeError(f"{verb}: jobs must be a Job, an id, a name, an instance id or a list of them, "
                        f"not {type(jobs).__name__}")
    for item in items:
        if isinstance(item, Job):
            if item._session is not session:
                raise JobNotFoundError(f"{verb}: Job {item.id} {item.name!r} belongs to another session; "
                                       f"use that session's verbs")
            if item.id not in every:
                raise JobNotFoundError(f"{verb}: Job {item.id} {item.name!r} was removed from this "
                                       f"session; start it again to run it again")
            out.append(item)
        elif isinstance(item, bool):
            raise TypeError(f"{verb}: a job id must be an int, not a bool")
        elif isinstance(item, int):
            found = every.get(item)
            if found is None:
                raise JobNotFoundError(f"{verb}: cannot find a job with the id {item}; "
                                       f"list the session's jobs with get_job()")
            out.append(found)
        elif isinstance(item, uuid.UUID):
            match = [j for j in every.values() if j._iid == item]
            if not match:
                raise JobNotFoundError(f"{verb}: cannot find a job with the instance id {item}; "
                                       f"list the session's jobs with get_job()")
            out.extend(match)
        elif isinstance(item, str):
            out.extend(by_names(every, [item], verb))
        else:
            raise TypeError(f"{verb}: cannot select a job with a {type(item).__name__} ({item!r}); "
                            f"give a Job, an id, a name or an instance id")
    return unique(out)

def by_names(every: Mapping[int, Job], names: list[str], verb: str) -> list[Job]:
    """Jobs whose name matches (case-insensitive wildcards); a plain name that matches none raises.

    A wildcard matches top-level jobs only, as PowerShell's ``-Name`` does: ``remove_job("*")``
    meant the hidden children named ``JobN`` too, and refused ("is a child job") to remove anything.
    A child is still found by its exact name.
    """
    out: list[Job] = []
    for name in names:
        pattern = _wildcard(name)
        wild = _has_wildcard(name)
        match = [j for j in every.values() if pattern.fullmatch(j.name) and not (wild and j._parent is not None)]
        if not match and not wild:
            raise JobNotFoundError(f"{verb}: cannot find a job named {name!r}; list the session's "
                                   f"jobs with get_job()")
        out.extend(match)
    return out


def unique(jobs: list[Job]) -> list[Job]:
    if len(jobs) < 2:
        return jobs  # one job, the common case (every caller passes a list of its own)
    seen: set[int] = set()
    out = []
    for job in jobs:
        if job.id not in seen:
            seen.add(job.id)
            out.append(job)
    return out


def _has_wildcard(text: str) -> bool:
    return any(c in text for c in "*?[")


_pattern_cache: dict[str, re.Pattern[str]] = {}


def _wildcard(text: str) -> re.Pattern[str]:
    pat = _pattern_cache.get(text)
    if pat is None:
        pat = re.compile(_translate(text), re.IGNORECASE | re.DOTALL)
        if len(_pattern_cache) < 1000 and len(text) <= 256:  # long selectors are one-offs
            _pattern_cache[text] = pat
    return pat


def _translate(text: str) -> str:
    """fnmatch.translate(text), in linear time. fnmatch searches the rest of the text for a `]`
    once per `[`, so 16,000 `[` took seconds of host CPU. A `[` with no `]` after it is a literal
    `[` to fnmatch anyway: those go through as a stand-in character, escaped back to `[` afterwards,
    which is exactly what fnmatch would have produced for them."""
    last = text.rfind("]")
    tail = text[last + 1:]
    if "[" not in tail:
        return fnmatch.translate(text)
    stand_in = next(c for c in map(chr, range(0xE000, 0xF900)) if c not in text)  # private use
    return fnmatch.translate(text[:last + 1] + tail.replace("[", stand_in)).replace(stand_in, "\\[")


def _strings(what: str, value: str | Iterable[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"get_job: {what} must be a str or a list of str, not {type(item).__name__}")
    return items


def _uuids(value: Any) -> list[uuid.UUID]:
    items = [value] if isinstance(value, (str, uuid.UUID)) else list(value)
    out = []
    for item in items:
        try:
            out.append(item if isinstance(item, uuid.UUID) else uuid.UUID(str(item)))
        except ValueError:
            raise ValueError(f"get_job: {item!r} is not an instance id (a UUID)") from None
    return out


def _as_timestamp(what: str, value: datetime | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"get_job: {what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        value = value.astimezone()  # a naive datetime means local time
    return value.timestamp()


def leaves_of(selected: list[Job], no_recurse: bool = False) -> list[Job]:
    """The leaf jobs under ``selected`` (or the selected jobs themselves), each once."""
    leaves: list[Job] = []
    for job in selected:
        leaves.extend([job] if no_recurse else job._leaves())
    return unique(leaves)


def descendants(job: Job) -> list[Job]:
    """Every job under ``job``, children before grandchildren of the next child."""
    out: list[Job] = []
    for child in job._children or ():
        out.append(child)
        out.extend(descendants(child))
    return out
