"""Fuzzing the two codecs that read bytes from another process: worker/_wire (frames and named
messages between a session and its workers) and host/_protocol (the session host's requests).

::

    hypothesis --bytes, truncations, unknown kinds, wrong types--> FrameReader.feed / recv_frame /
        <Message>.decode / decode_records(_oob)          --> frames, or ProtocolError, at once
    hypothesis --JSON values, broken frames--> decode_request / read_frame --> a Request, or
        ProtocolError;  a live host --the same garbage--> an error reply, and it keeps serving

What each reader promises: garbage ends in ``ProtocolError`` (a message a user can act on, which
the backends turn into the job's failure reason), never another exception escaping the reader,
never a hang, never an allocation of the size a header announces. The budget is small
(``max_examples``, a deadline per example), so that this runs with every test run.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psjobs._errors import ProtocolError
from psjobs.host import _protocol as hp
from psjobs.worker import _wire as w

from .clitools import host_pid, ok, private_home

BUDGET = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

MESSAGES: list[type[Any]] = [w.Hello, w.JobMsg, w.Done, w.Prompt, w.Answer, w.Info, w.Refuse, w.Exit, w.Stop,
                             w.Pause]
SAMPLES: list[Any] = [
    w.Hello(w.VERSION, 4242, (3, 12)),
    w.JobMsg(b"call", "/tmp", {"A": "1"}, ["/x"]),
    w.Done("fail", b"reason", "Traceback...", 3),
    w.Prompt("name? "),
    w.Answer("yes"),
    w.Info({"python": [3, 12]}),
    w.Refuse("too old"),
    w.Exit(256),
    w.Stop(2.5),
    w.Pause(True),
]

#: values of every JSON/pickle type, nested, for "wrong types"
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


# --- worker/_wire ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@BUDGET
@given(st.sampled_from(MESSAGES), st.binary(max_size=300))
def test_a_message_decoder_given_garbage_raises_protocol_error_or_decodes(cls: type[Any], payload: bytes) -> None:
    try:
        message = cls.decode(payload)
    except ProtocolError as exc:
        assert cls.kind.name in str(exc) or "DONE" in str(exc)
    else:
        assert isinstance(message, cls)


@pytest.mark.timeout(120)
@BUDGET
@given(st.sampled_from(MESSAGES[:5]), ANY_VALUE)
def test_a_pickled_message_of_the_wrong_shape_or_types_is_a_protocol_error(cls: type[Any], value: Any) -> None:
    # The pickled messages (Hello, JobMsg, Done, Prompt, Answer) given any other value: either it
    # decodes into fields of the documented types, or ProtocolError names the frame.
    try:
        message = cls.decode(pickle.dumps(value))
    except ProtocolError as exc:
        assert cls.kind.name in str(exc) or "DONE" in str(exc), exc
        return
    if isinstance(message, w.Hello):
        assert isinstance(message.version, int) and isinstance(message.pid, int)
    elif isinstance(message, w.Done):
        assert message.event in ("complete", "fail", "stopped")
        assert message.reason is None or isinstance(message.reason, bytes)
        assert message.exit_code is None or isinstance(message.exit_code, int)
    elif isinstance(message, w.JobMsg):
        assert isinstance(message.call, bytes)
    else:
        assert isinstance(message.text, str)


@pytest.mark.timeout(120)
@BUDGET
@given(st.lists(st.sampled_from(range(len(SAMPLES))), min_size=1, max_size=6), st.data())
def test_frames_split_anywhere_come_out_whole_and_in_order(picks: list[int], data: st.DataObject) -> None:
    sent = [SAMPLES[i] for i in picks]
    stream = b"".join(m.frame() for m in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = w.FrameReader()
    frames: list[tuple[int, bytes | bytearray]] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        frames += reader.feed(stream[start:end])
    assert not reader.pending()
    assert [(kind, type(m).decode(p)) for (kind, p), m in zip(frames, sent)] == [(m.kind, m) for m in sent]


@pytest.mark.timeout(120)
@BUDGET
@given(st.binary(min_size=1, max_size=400), st.integers(1, 64))
def test_the_frame_reader_given_garbage_raises_protocol_error_without_allocating(data: bytes, step: int) -> None:
    reader = w.FrameReader()
    try:
        for start in range(0, len(data), step):
            for kind, payload in reader.feed(data[start:start + step]):
                assert kind in set(w.Kind) and len(payload) <= len(data)
    except ProtocolError as exc:
        assert "frame" in str(exc)
    # Whatever it kept waits for a frame no larger than the limit: a header never allocates more.
    assert len(reader._buf) <= len(data)


@pytest.mark.timeout(120)
@BUDGET
@given(st.integers(0, 2**32 - 1), st.integers(0, 255))
def test_a_header_of_an_unknown_kind_or_an_oversized_length_is_refused_before_reading_on(
        length: int, kind: int) -> None:
    head = w.HEADER.pack(length, kind)
    if kind in set(w.Kind) and length <= w.MAX_FRAME:
        w.check(length, kind)
        return
    with pytest.raises(ProtocolError, match=r"unknown frame kind|over the"):
        w.FrameReader().feed(head)
    r, s = socket.socketpair()
    with r, s:
        s.sendall(head)  # the blocking reader on the worker's side checks the header alone
        with pytest.raises(ProtocolError):
            w.recv_frame(r.fileno())


@pytest.mark.timeout(120)
@BUDGET
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_a_frame_cut_short_by_the_peer_is_a_protocol_error_not_a_hang(pick: int, data: st.DataObject) -> None:
    whole = SAMPLES[pick].frame()
    cut = data.draw(st.integers(1, len(whole) - 1))
    r, s = socket.socketpair()
    with r:
        with s:
            s.sendall(whole[:cut])
        r.settimeout(5)  # a reader that waited for bytes that never come would fail here, not hang
        with pytest.raises(ProtocolError, match="middle of a frame"):
            w.recv_frame(r.fileno())
    reader = w.FrameReader()
    assert reader.feed(whole[:cut]) == [] and reader.pending()


@pytest.mark.timeout(120)
@BUDGET
@given(st.lists(st.tuples(st.integers(0, 5), JSON_VALUE | st.binary(max_size=20), st.floats(allow_nan=False)),
                max_size=20),
       st.data())
def test_record_batches_round_trip_and_a_cut_batch_is_an_error(entries: list[tuple[int, Any, float]],
                                                                 data: st.DataObject) -> None:
    streams = bytes(s for s, _, _ in entries)
    kind, parts = w.encode_records(streams, [v for _, v, _ in entries], [t for _, _, t in entries])
    payload = b"".join(bytes(p) for p in parts)
    assert w.decode_entries(kind, payload) == entries
    # Cut short, a batch raises (every backend turns that into an error record, and the job goes on).
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(Exception):  # noqa: B017 - pickle raises several types; none may escape a reader
        w.decode_entries(kind, payload[:cut])


# --- host/_protocol ----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@BUDGET
@given(st.binary(max_size=300))
def test_a_request_body_of_any_bytes_is_a_request_or_a_protocol_error(body: bytes) -> None:
    try:
        request = hp.decode_request(body)
    except ProtocolError:
        return
    assert isinstance(request, hp.Request)


@pytest.mark.timeout(120)
@BUDGET
@given(st.sampled_from(sorted(hp.REQUESTS)), st.dictionaries(
    st.sampled_from(["ids", "names", "command", "cwd", "name", "thread", "env", "timeout", "keep", "wait",
                     "any", "force", "state", "records", "computer", "children", "x"]), JSON_VALUE, max_size=6))
def test_a_known_verb_with_arguments_of_any_type_is_checked(verb: str, args: dict[str, Any]) -> None:
    body = json.dumps({"verb": verb, "args": args}).encode()
    try:
        request = hp.decode_request(body)
    except ProtocolError as exc:
        assert verb in str(exc) or "JSON" in str(exc), exc
        return
    assert request.verb == verb
    # What was accepted has the declared types (a handler never meets a str where a list was due).
    for field, value in vars(request).items():
        declared = type(request).__annotations__[field]  # strings: the module has postponed annotations
        if value is not None and "list[str]" in str(declared):
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), (field, value)
        if value is not None and str(declared).startswith("bool"):
            assert isinstance(value, bool), (field, value)


@pytest.mark.timeout(120)
@BUDGET
@given(st.binary(max_size=64), st.booleans())
def test_a_host_frame_broken_anywhere_is_a_protocol_error_or_a_clean_end(data: bytes, with_header: bool) -> None:
    if with_header:
        data = hp.HEADER.pack(hp.MAGIC, hp.VERSION, len(data) + 7) + data  # announces more than comes
    r, s = socket.socketpair()
    with r:
        with s:
            s.sendall(data)
        r.settimeout(5)
        try:
            body = hp.read_frame(r, hp.MAX_REQUEST, "the client")
        except ProtocolError:
            return
        assert body is None or len(body) <= len(data)


@pytest.fixture(scope="module")
def host_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_home(tmp_path_factory.mktemp("fuzzhost") / "h") as home:
        ok("get")  # starts the host
        yield home


@pytest.mark.timeout(180)
@settings(max_examples=40, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), JSON_VALUE.map(lambda v: json.dumps(v).encode()),
                      st.builds(lambda verb, args: json.dumps({"verb": verb, "args": args}).encode(),
                                st.sampled_from(["get", "status", "receive", "wait", "stop", "remove", "nope"]),
                                st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=3))))
def test_a_live_host_answers_garbage_with_an_error_and_keeps_serving(host_home: Path, body: bytes) -> None:
    pid = host_pid(host_home)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(host_home / "host.sock"))
        s.settimeout(20)  # an answer that never came fails here instead of hanging the run
        s.sendall(hp.HEADER.pack(hp.MAGIC, hp.VERSION, len(body)) + body)
        answer: dict[str, Any] = {"more": True}
        while answer.get("more"):  # a receive's parts come first, then its final frame
            answer = json.loads(hp.read_frame(s, hp.MAX_RESPONSE, "the host") or b"null")
            assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        if not answer["ok"]:
            assert answer["error"]["message"] and isinstance(answer["error"]["exit_code"], int), answer
        s.sendall(hp.pack({"verb": "status"}))  # the same connection goes on
        status = json.loads(hp.read_frame(s, hp.MAX_RESPONSE, "the host") or b"null")
        assert status["ok"] and status["result"]["pid"] == pid, status
    assert host_pid(host_home) == pid


def test_an_oversized_pickle_length_in_a_records_oob_header_is_an_error() -> None:
    head = pickle.dumps((10**12, [10**12], 1, []))
    payload = struct.pack("!I", len(head)) + head + os.urandom(32)
    with pytest.raises(ProtocolError, match="RECORDS_OOB"):
        w.decode_records_oob(payload)
