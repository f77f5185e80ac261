"""open_store's URL registry, id validation and the contract's helpers."""

from __future__ import annotations

import importlib.abc
import re
import sys
import types
from pathlib import Path

import pytest

import chatsession
import chatsession.store as registry
from chatsession import InvalidIdError, InvalidURLError, MissingDependencyError, open_store
from chatsession.store import default_store_url
from chatsession.store.base import (
    SessionRecord,
    decode_cursor,
    encode_cursor,
    fork_segments,
    validate_id,
)


@pytest.mark.parametrize("url", ["foo://x", "http://example.com/db", "mysql://root@127.0.0.1/test"])
def test_unknown_scheme_names_the_known_ones(url: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        open_store(url)
    message = str(info.value)
    assert url.split(":")[0] in message
    for scheme in ("memory://", "sqlite://", "file://", "redis://", "postgresql://"):
        assert scheme in message


@pytest.mark.parametrize("url", ["", "   ", "no-scheme-at-all"])
def test_empty_or_schemeless_url_is_refused(url: str) -> None:
    with pytest.raises(InvalidURLError):
        open_store(url)


def test_missing_driver_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a backend module whose driver package is not installed
    (tmp_path / "cs_fake_backend.py").write_text("import cs_missing_driver_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        registry._BACKENDS,
        "fakedb",
        ("cs_fake_backend", "FakeStore", "fakedb", "cs_missing_driver_pkg"),
    )
    with pytest.raises(MissingDependencyError) as info:
        open_store("fakedb://127.0.0.1/x")
    assert "pip install 'chatsession[fakedb]'" in str(info.value)
    assert isinstance(info.value, ImportError)


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Finds nothing for one package and its submodules, as if it were not installed."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == self.package or fullname.startswith(self.package + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def _hide(monkeypatch: pytest.MonkeyPatch, how: str, driver: str, backend_module: str) -> None:
    """Make ``driver`` unimportable and forget ``backend_module``, so it is imported again."""
    for name in [n for n in sys.modules if n == driver or n.startswith(driver + ".")]:
        if how == "none":  # sys.modules[name] = None: "import of ... halted"
            monkeypatch.setitem(sys.modules, name, None)
        else:
            monkeypatch.delitem(sys.modules, name)
    if how == "none":
        monkeypatch.setitem(sys.modules, driver, None)
    else:
        monkeypatch.setattr(sys, "meta_path", [_NotInstalled(driver), *sys.meta_path])
    monkeypatch.delitem(sys.modules, backend_module, raising=False)
    monkeypatch.delattr(registry, backend_module.rsplit(".", 1)[1], raising=False)


@pytest.mark.parametrize("how", ["not-installed", "none"])
@pytest.mark.parametrize(
    ("url", "driver", "backend_module", "extra"),
    [
        ("redis://127.0.0.1:6379/0", "redis", "chatsession.store.redis", "redis"),
        ("rediss://127.0.0.1:6380/0", "redis", "chatsession.store.redis", "redis"),
        ("postgresql://u@127.0.0.1/db", "asyncpg", "chatsession.store.postgres", "postgres"),
        ("postgres://u@127.0.0.1/db", "asyncpg", "chatsession.store.postgres", "postgres"),
    ],
)
def test_missing_real_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    url: str,
    driver: str,
    backend_module: str,
    extra: str,
) -> None:
    _hide(monkeypatch, how, driver, backend_module)
    with pytest.raises(MissingDependencyError) as info:
        open_store(url)
    message = str(info.value)
    assert f"pip install 'chatsession[{extra}]'" in message
    assert repr(driver) in message
    assert (info.value.extra, info.value.module) == (extra, driver)
    assert backend_module not in sys.modules  # nothing half-imported is left behind


def test_memory_url_with_options_is_refused() -> None:
    with pytest.raises(InvalidURLError, match="memory://"):
        open_store("memory://?x=1")


def test_unknown_memory_option_is_refused() -> None:
    with pytest.raises(InvalidURLError, match="memory://"):
        open_store("memory://", x=1)


def test_default_store_is_sqlite_in_the_data_dir(env_setup: Path) -> None:
    url = default_store_url()
    assert url == "sqlite:///" + str(env_setup / "sessions.db")


def test_store_url_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSESSION_STORE_URL", "memory://")
    assert default_store_url() == "memory://"
    assert open_store().url == "memory://"


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "a/b", "a\\b", ".hidden", "a\nb", "a\x00b", "tab\there", "é", "a" * 129, "a b"],
)
def test_bad_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(bad)
    assert "session id" in str(info.value)


@pytest.mark.parametrize("bad", [None, 12, b"bytes"])
def test_non_string_ids_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidIdError, match="must be a string"):
        validate_id(bad)


@pytest.mark.parametrize("good", ["a", "A-b_c.d", "0" * 128, "3f2a9c1e", "user.42"])
def test_good_ids_pass(good: str) -> None:
    assert validate_id(good) == good


def test_cursor_round_trip_and_garbage() -> None:
    record = SessionRecord(id="s-1", created_at=1234.5)
    assert decode_cursor(encode_cursor(record)) == (1234.5, "s-1")
    with pytest.raises(ValueError, match="bad listing cursor"):
        decode_cursor("not-a-cursor")


def test_fork_segments_plan_reads_across_a_chain() -> None:
    # root r (events 1..10), child c forked at 6 (own 7..9), grandchild g forked at 8 (own 9..12)
    lineage = [("g", 8), ("c", 6), ("r", 0)]
    assert fork_segments(lineage, head=12) == [("r", 0, 6), ("c", 6, 8), ("g", 8, 12)]
    assert fork_segments(lineage, head=12, after_seq=7) == [("c", 7, 8), ("g", 8, 12)]
    assert fork_segments(lineage, head=12, upto_seq=5) == [("r", 0, 5)]
    assert fork_segments(lineage, head=12, after_seq=12) == []
    # a grandchild forked before its parent's own fork point reads only the root
    assert fork_segments([("g", 3), ("c", 6), ("r", 0)], head=3) == [("r", 0, 3)]


def test_public_names_are_exported() -> None:
    public = sorted(n for n in dir(chatsession) if not n.startswith("_") and n != "annotations")
    assert sorted(set(chatsession.__all__) - {"__version__"}) == sorted(
        n for n in public if not isinstance(getattr(chatsession, n), types.ModuleType)
    )


# -- secrets in URLs ------------------------------------------------------------

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://admin:{SECRET}@127.0.0.1/x",  # unknown scheme
        f"redis://admin:{SECRET}@127.0.0.1:abc/0",  # port not a number
        f"redis://admin:{SECRET}@127.0.0.1:65536/0",  # port out of range
        f"postgresql://admin:{SECRET}@127.0.0.1:-5/db",
        f"postgresql://admin:{SECRET}@[::1/db",  # IPv6 host left open
        f"sqlite://admin:{SECRET}@host/x.db",  # sqlite takes no host
        f"file://admin:{SECRET}@host/dir",  # file takes no host
        f"memory://admin:{SECRET}@host",  # memory takes nothing
        f"sqlite:///x.db?password={SECRET}",  # unknown option
        f"file:///x?token={SECRET}",  # unknown option
        f"memory://?api_key={SECRET}",
    ],
)
def test_bad_urls_never_show_the_password(url: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        open_store(url)
    message = str(info.value)
    assert SECRET not in message and SECRET not in repr(info.value)
    if "admin" in message:  # the URL is shown: with its password masked
        assert "admin:***@" in message, message
    cause = info.value.__cause__ or info.value.__context__
    assert cause is None or SECRET not in str(cause)


@pytest.mark.parametrize(
    "url",
    ["redis://h:port/0", "redis://h:70000/0", "postgresql://u@h:5432x/db", "sqlite://h:x/a.db"],
)
def test_a_bad_port_is_an_invalid_url(url: str) -> None:
    with pytest.raises(InvalidURLError, match="port"):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://admin:{SECRET}@127.0.0.1:6379/0",
        f"rediss://:{SECRET}@127.0.0.1:6380/0",
        f"postgresql://admin:{SECRET}@127.0.0.1:5432/test",
        f"postgres://admin:{SECRET}@127.0.0.1/test?sslmode=disable",
    ],
)
async def test_opened_stores_never_show_the_password(url: str) -> None:
    store = open_store(url)  # connects lazily: nothing is reached here
    try:
        assert SECRET not in store.url and "***" in store.url
        assert SECRET not in repr(store) and SECRET not in str(store)
    finally:
        await store.aclose()


# -- the shared option parser (store/options.py) -------------------------------------------

from chatsession.store.options import choice, flag, integer, parse_options, seconds, text  # noqa: E402

SPEC = {
    "mode": choice("fast", "safe", default="safe"),
    "count": integer(1, 10, default=5),
    "wait": seconds(0, 60, default=1.0, low_open=True),
    "sync": flag(),
    "prefix": text("p:", pattern=r"[a-z:]{1,8}", describe="1-8 of a-z and ':'"),
    "password": text(secret=True),
}


def test_options_are_typed_with_defaults_and_keywords_win() -> None:
    values = parse_options("x://h/?mode=FAST&count=7&wait=.5&sync=yes", SPEC, backend="x")
    assert values == {
        "mode": "fast",
        "count": 7,
        "wait": 0.5,
        "sync": True,
        "prefix": "p:",
        "password": None,
    }
    values = parse_options(
        "x://h/?count=7&prefix=a:", SPEC, {"count": 2, "prefix": None}, backend="x"
    )
    assert (values["count"], values["prefix"]) == (2, "a:")  # None hides nothing


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("x://h/?colour=red", "unknown option(s) 'colour'"),
        ("x://h/?count=1&count=2", "more than once"),
        ("x://h/?count", "malformed query"),
        ("x://h/?count=11", "count must be a whole number from 1 to 10"),
        ("x://h/?count=1.0", "whole number"),
        ("x://h/?wait=0", "above 0"),
        ("x://h/?wait=nan", "seconds"),
        ("x://h/?sync=maybe", "0 or 1"),
        ("x://h/?mode=slow", "one of fast, safe"),
        ("x://h/?prefix=UPPER", "1-8 of a-z"),
    ],
)
def test_bad_options_are_invalid_urls_naming_the_option(url: str, words: str) -> None:
    with pytest.raises(InvalidURLError, match=re.escape(words)) as info:
        parse_options(url, SPEC, backend="x")
    assert str(info.value).startswith("x store URL x://h/")


def test_a_secret_option_is_never_shown() -> None:
    for url, overrides in (
        (f"x://u:{SECRET}@h/?colour={SECRET}&password={SECRET}", {}),
        ("x://h/", {"password": 12345, "count": "many"}),
        ("x://h/", {"password": SECRET, "count": "many"}),
    ):
        with pytest.raises(InvalidURLError) as info:
            parse_options(url, SPEC, overrides, backend="x")
        assert SECRET not in str(info.value) and "12345" not in str(info.value)
