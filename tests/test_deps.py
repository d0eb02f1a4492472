"""The supported ranges of the libraries whose internals we touch: stated once, enforced at import."""

import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest

from ttt_speech import deps

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_same_ranges_as_deps():
    """pyproject's extras and deps.SUPPORTED cannot drift apart: pip and the import check agree."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for reqs in extras.values():
        for req in reqs:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", req.split(";")[0].strip()).groups()
            pins[name] = spec
    for dist in ("transformers", "torchao", "flash-linear-attention"):
        assert pins[dist].replace(" ", "") == deps.SUPPORTED[dist], dist
        assert "<" in pins[dist] or "==" in pins[dist], f"{dist} has no upper bound"
    # moshi is installed with --no-deps by the README's commands (and .ci/run, which runs one verbatim)
    assert deps.SUPPORTED["moshi"] == "==0.2.13"
    for doc in ("README.md", ".ci/run"):
        assert "--no-deps moshi==0.2.13" in (ROOT / doc).read_text(), doc


@pytest.fixture
def no_override(monkeypatch):
    """The refusal itself is under test: a suite run with TTT_SPEECH_ALLOW_UNTESTED (how a range is widened,
    README) must not let these tests' fake releases through."""
    monkeypatch.delenv(deps.OVERRIDE_ENV, raising=False)


def test_require_refuses_an_untested_release_naming_both(monkeypatch, no_override):
    monkeypatch.setattr(deps, "version", lambda dist: "5.26.0")
    with pytest.raises(deps.UnsupportedVersionError) as e:
        deps.require("transformers")
    msg = str(e.value)
    assert "transformers 5.26.0 is installed" in msg and "pip install 'transformers>=5.23,<5.26'" in msg
    assert "\n" not in msg
    monkeypatch.setenv(deps.OVERRIDE_ENV, "torchao, transformers")  # how a range is widened: run the suite
    assert deps.require("transformers") == "5.26.0"
    monkeypatch.setattr(deps, "version", lambda dist: "0.2.12")
    with pytest.raises(deps.UnsupportedVersionError, match=r"pip install --no-deps 'moshi==0\.2\.13'"):
        deps.require("moshi")


def test_an_untested_release_ends_a_command_with_one_line(monkeypatch, capsys, no_override):
    from ttt_speech.errors import one_line_errors

    monkeypatch.setattr(deps, "version", lambda dist: "0.19.0")
    with pytest.raises(SystemExit) as e, one_line_errors("ttt-speech generate", debug=False):
        deps.require("torchao")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "torchao 0.19.0 is installed" in err


def test_require_names_a_missing_distribution(monkeypatch):
    def missing(dist):
        raise deps.PackageNotFoundError(dist)

    monkeypatch.setattr(deps, "version", missing)
    with pytest.raises(deps.UnsupportedVersionError, match="torchao is not installed; run: pip install 'torchao==0.18.0'"):
        deps.require("torchao")


def test_hf_integration_refuses_an_untested_transformers_at_import(monkeypatch, no_override):
    pytest.importorskip("transformers")
    compat = importlib.import_module("ttt_speech.hf.compat")
    monkeypatch.setattr(deps, "version", lambda dist: "5.22.0")
    try:
        with pytest.raises(deps.UnsupportedVersionError, match="transformers 5.22.0 is installed"):
            importlib.reload(compat)
    finally:  # a reload that did not refuse would leave 5.22's spellings to every later HF test
        monkeypatch.undo()
        importlib.reload(compat)


def test_the_installed_releases_are_supported():
    """The suite itself runs on supported releases only (else its numbers say nothing about them)."""
    for dist in deps.SUPPORTED:
        if deps.installed(dist) is not None:
            deps.require(dist)


def test_cache_kwarg_is_what_the_installed_transformers_calls_it():
    """Fails loudly when a release renames the cache argument again (5.24 did: past_key_values -> cache)."""
    pytest.importorskip("transformers")
    from transformers import LlamaModel
    from transformers.masking_utils import create_sliding_window_causal_mask

    from ttt_speech.hf import compat

    for fn in (LlamaModel.forward, create_sliding_window_causal_mask):
        assert compat.CACHE_KWARG in inspect.signature(fn).parameters, fn.__qualname__
    from transformers.modeling_outputs import BaseModelOutputWithPast

    assert compat.CACHE_KWARG in BaseModelOutputWithPast.__dataclass_fields__
