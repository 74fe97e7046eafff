"""Shared answers (daemon/http/shared.py): one is handed only to requests that arrived before all
of its data was read, and a late-finishing older answer never replaces a newer one."""

from __future__ import annotations

from daemon.http.shared import KEPT_ANSWERS, SharedAnswers


def test_an_answer_read_after_arrival_is_shared_one_read_before_is_not() -> None:
    answers = SharedAnswers()
    answers.keep("all", read_at=10.0, body=b"a")
    assert answers.fresh("all", arrived=9.5) == b"a"
    assert answers.fresh("all", arrived=10.0) == b"a"
    assert answers.fresh("all", arrived=10.1) is None  # its data is older than the request
    assert answers.fresh("page 2", arrived=0.0) is None


def test_an_older_answer_finishing_late_does_not_replace_a_newer_one() -> None:
    answers = SharedAnswers()
    answers.keep("all", read_at=12.0, body=b"new")
    answers.keep("all", read_at=11.0, body=b"old")
    assert answers.fresh("all", arrived=11.5) == b"new"


def test_remembered_answers_stay_bounded() -> None:
    answers = SharedAnswers()
    for page in range(KEPT_ANSWERS + 1):
        answers.keep(page, read_at=1.0, body=b"x")
    assert answers.fresh(KEPT_ANSWERS, arrived=0.0) == b"x"
    assert answers.fresh(0, arrived=0.0) is None
