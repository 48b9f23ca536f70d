"""Shared fixtures: a project folder wired to small datasets in the real layouts and a local mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from fixtures import FixtureProject, Mirror, build_fixture_project


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite MLflow store for the session (creating a store runs migrations: do it once)."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def fixture_template(tmp_path_factory: pytest.TempPathFactory) -> FixtureProject:
    """The archives and manifests, built once per session (copied per test by `project`)."""
    return build_fixture_project(tmp_path_factory.mktemp("fixture-template"))


@pytest.fixture
def project(fixture_template: FixtureProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FixtureProject:
    """A fresh copy of the fixture project as the working directory, with its configs in force."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(fixture_template.root, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("SEGPIPE_CONFIG_DIR", str(root / "configs"))
    monkeypatch.delenv("SEGPIPE_MIRROR", raising=False)
    archives = {
        k: [root / p.relative_to(fixture_template.root) for p in v] for k, v in fixture_template.archives.items()
    }
    return FixtureProject(root, archives)


@pytest.fixture
def mirror(project: FixtureProject) -> Iterator[Mirror]:
    """The local HTTP mirror serving the project's archives on 127.0.0.1."""
    with Mirror(project.mirror_dir) as server:
        yield server
