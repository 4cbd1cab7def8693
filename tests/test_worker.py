"""What runs outside the session, shared by every kind of job: line splitting, the wire codec."""

from __future__ import annotations

import subprocess
import sys

import pytest

import psjobs
from psjobs.worker import _remote_boot as boot
from psjobs.worker import _wire

# CRLF line ends, an empty line, invalid UTF-8 and a last line without its newline.
PRINTER = r"import sys; sys.stdout.buffer.write(b'a\r\n\nb\xff\nno newline'); sys.stderr.buffer.write(b'e1\r\ne2')"
LINES = ["a", "", "b\ufffd", "no newline"]


def _fd_level_printer() -> None:
    """A callable whose output goes to fd 1 and 2 through a child process (the pipe readers)."""
    subprocess.run([sys.executable, "-c", PRINTER], check=True)


@pytest.mark.parametrize("start", ["start_job", "start_thread_job"])
def test_a_command_s_lines_are_the_same_for_every_kind(session: psjobs.Session, start: str) -> None:
    job = getattr(session, start)([sys.executable, "-c", PRINTER])
    assert job.wait(30) and job.state is psjobs.JobState.COMPLETED, job.reason
    assert job.output == LINES
    assert [str(e) for e in job.error] == ["e1", "e2"]


def test_a_process_job_s_fd_level_lines_split_the_same_way(session: psjobs.Session) -> None:
    job = session.start_job(_fd_level_printer)
    assert job.wait(30) and job.state is psjobs.JobState.COMPLETED, job.reason
    assert [str(r) for r in job.information] == LINES
    assert [str(e) for e in job.error] == ["e1", "e2"]


def test_every_message_comes_back_as_it_went() -> None:
    messages = [_wire.Hello(_wire.VERSION, 42, (3, 11)), _wire.JobMsg(b"call", "/tmp", {"A": "1"}, ["/x"]),
                _wire.Done("fail", b"reason", "tb text", 3), _wire.Prompt("name?"), _wire.Answer("psjobs"),
                _wire.Info({"python": [3, 11, 0]}), _wire.Refuse("why"), _wire.Exit(256),
                _wire.Stop(1.5), _wire.Pause(True)]
    reader = _wire.FrameReader()
    stream = b"".join(m.frame() for m in messages)
    frames = []
    for i in range(0, len(stream), 7):  # in small pieces, as a channel may deliver them
        frames += reader.feed(stream[i:i + 7])
    assert not reader.pending()
    assert [type(m).decode(payload) for m, (_, payload) in zip(messages, frames)] == messages
    assert [kind for kind, _ in frames] == [m.kind for m in messages]


def test_a_frame_over_the_cap_or_of_an_unknown_kind_is_refused_before_it_is_read() -> None:
    with pytest.raises(psjobs.ProtocolError, match="over the"):
        _wire.FrameReader().feed(_wire.HEADER.pack(_wire.MAX_FRAME + 1, _wire.Kind.RECORDS))
    with pytest.raises(psjobs.ProtocolError, match="unknown frame kind 99"):
        _wire.FrameReader().feed(_wire.HEADER.pack(1, 99) + b"x")
    with pytest.raises(psjobs.ProtocolError, match="over the"):
        _wire.header(_wire.Kind.RECORDS, _wire.MAX_FRAME + 1)


def test_the_remote_first_stage_speaks_the_codec_s_header_and_cap() -> None:
    source = boot.boot0((3, 11), {"computer": "c"})
    assert repr(_wire.HEADER.format) in source and str(_wire.MAX_FRAME) in source
    assert f"{int(_wire.Kind.R_REFUSE)})+t" in source
    compile(source, "<boot0>", "exec")  # it must be valid Python as sent


def test_the_remote_refuses_another_python_with_a_frame_of_the_codec() -> None:
    source = boot.boot0((3, 99), {"computer": "c"})
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    out = done.stdout
    assert out.startswith(boot.MARK)
    frames = _wire.FrameReader().feed(out[len(boot.MARK):])
    assert [kind for kind, _ in frames] == [_wire.Kind.R_REFUSE]
    assert "the session Python 3.99" in _wire.Refuse.decode(frames[0][1]).text
