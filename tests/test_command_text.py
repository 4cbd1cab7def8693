"""A job's ``command`` is the readable text of what runs (API.md section 2): a lambda's own source,
told apart from the other lambdas on its line, so that get_job(command=...) finds it."""

from __future__ import annotations

import sys

import pytest

import psjobs

columns = pytest.mark.skipif(sys.version_info < (3, 11), reason="a code's columns (co_positions) are 3.11+")


@columns
def test_two_lambdas_with_the_same_parameters_on_one_line_each_have_their_own_command(
        session: psjobs.Session) -> None:
    first, second = session.start_thread_job(lambda: "first"), session.start_thread_job(lambda: "second")
    assert (first.command, second.command) == ('lambda: "first"', 'lambda: "second"')
    assert session.get_job(command="*second*") == [second]
    assert second.wait(10) and second.receive() == ["second"]


@columns
def test_a_lambda_made_by_a_lambda_is_its_own_text(session: psjobs.Session) -> None:
    makers = (lambda: (lambda: "inner"),)
    outer, inner = session.start_thread_job(makers[0]), session.start_thread_job(makers[0]())
    assert (outer.command, inner.command) == ('lambda: (lambda: "inner")', 'lambda: "inner"')


def test_lambdas_with_other_parameters_on_one_line_each_have_their_own_command(session: psjobs.Session) -> None:
    one, two = session.start_thread_job(lambda a: a, 1), session.start_thread_job(lambda b: b, 2)
    assert (one.command, two.command) == ("lambda a: a", "lambda b: b")
