"""One public face: psjobs.__all__ is sorted, complete and honest."""

from __future__ import annotations

import types

import psjobs


def test_all_is_sorted_and_exists() -> None:
    assert psjobs.__all__ == sorted(psjobs.__all__)
    for name in psjobs.__all__:
        assert hasattr(psjobs, name), name


def test_every_public_name_is_in_all() -> None:
    public = {n for n, v in vars(psjobs).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public - set(psjobs.__all__) <= {"load_ipython_extension", "unload_ipython_extension"}


def test_public_objects_say_they_come_from_psjobs() -> None:
    for name in psjobs.__all__:
        obj = getattr(psjobs, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__module__ == "psjobs", name


def test_api_md_names_exist() -> None:
    for name in ["start_job", "start_thread_job", "invoke_command", "get_job", "receive_job", "wait_job",
                 "stop_job", "remove_job", "Job", "JobState", "JobStateInfo", "Session", "format_table",
                 "write_output", "write_error", "write_warning", "write_verbose", "write_debug",
                 "write_information", "write_progress", "stop_requested", "job_input", "PsJobsError",
                 "JobNotFoundError", "JobNotFinishedError", "JobFailedError", "JobStopped"]:
        assert name in psjobs.__all__, name
    assert issubclass(psjobs.JobNotFoundError, LookupError)
    assert not issubclass(psjobs.JobStopped, Exception)
    for exc in ("JobNotFoundError", "JobNotFinishedError", "JobFailedError", "WorkerError"):
        assert issubclass(getattr(psjobs, exc), psjobs.PsJobsError)
