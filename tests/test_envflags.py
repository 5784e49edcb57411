"""envflags.off reads the hot-path switches without os.environ.get: it must see every change made through os.environ."""

from __future__ import annotations

import os

from unipeft import envflags


def test_off_follows_os_environ(monkeypatch) -> None:
    monkeypatch.delenv("UNIPEFT_TEST_FLAG", raising=False)
    assert not envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "0")
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    assert not envflags.off("UNIPEFT_TEST_FLAG")
    os.environ["UNIPEFT_TEST_FLAG"] = "0"
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.delenv("UNIPEFT_TEST_FLAG")
    assert not envflags.off("UNIPEFT_TEST_FLAG")


def test_off_without_the_fast_path(monkeypatch) -> None:
    """Another os.environ (or a Python without its backing dict): the ordinary lookup."""
    monkeypatch.setattr(os, "environ", {"UNIPEFT_TEST_FLAG": "0"})
    assert envflags.off("UNIPEFT_TEST_FLAG")
    monkeypatch.setattr(envflags, "_FAST", False)
    monkeypatch.setattr(os, "environ", {"UNIPEFT_TEST_FLAG": "1"})
    assert not envflags.off("UNIPEFT_TEST_FLAG")


def test_raw_follows_os_environ(monkeypatch) -> None:
    monkeypatch.delenv("UNIPEFT_TEST_FLAG", raising=False)
    assert envflags.raw("UNIPEFT_TEST_FLAG") is None
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    one = envflags.raw("UNIPEFT_TEST_FLAG")
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "0")
    assert envflags.raw("UNIPEFT_TEST_FLAG") not in (None, one)
    monkeypatch.setenv("UNIPEFT_TEST_FLAG", "1")
    assert envflags.raw("UNIPEFT_TEST_FLAG") == one
