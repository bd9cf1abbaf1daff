"""What a package index and an installer read: licence, changelog, URLs, classifiers, the extras' markers, py.typed."""

import tomllib

import pytest

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_licence_file_matches_the_declared_licence():
    text = (REPO / "LICENSE").read_text()
    assert PROJECT["license"] == {"text": "MIT"}
    assert text.startswith("MIT License") and "Copyright (c) 2026 lightcnn developers" in text
    assert "License :: OSI Approved :: MIT License" in PROJECT["classifiers"]


def test_changelog_has_the_unreleased_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert "## 0.2.0 (Unreleased)" in text
    for item in ("python -m lightcnn.compile", "--config", "list_models", "reset_head", "tbb", "BrokenPipe"):
        assert item in text, item


def test_urls_classifiers_script_and_typed_marker():
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(PROJECT["urls"])
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert PROJECT["scripts"] == {"lightcnn": "lightcnn.__main__:main"}
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["lightcnn"]


@pytest.mark.parametrize("extra", [None, "fast", "compare"])
@pytest.mark.parametrize("machine,wanted", [("x86_64", True), ("AMD64", True), ("arm64", False),
                                            ("aarch64", False)])
def test_tbb_is_required_only_where_it_has_wheels(extra, machine, wanted):
    """tbb is a dependency (None: the core list) and in the old extras, each time only where it has wheels."""
    requirements = pytest.importorskip("packaging.requirements")
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    tbb = [requirements.Requirement(r) for r in listed if r.startswith("tbb")]
    assert len(tbb) == 1 and tbb[0].marker is not None
    assert tbb[0].marker.evaluate({"platform_machine": machine}) is wanted
