"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s smoke`, `nox -s docs`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (what CI runs)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "jepa", "plugins", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session
def smoke(session: nox.Session) -> None:
    """Install, check the paper recipe, and pretrain the quickstart briefly in a scratch directory."""
    session.install("-e", ".")
    tmp = session.create_tmp()
    session.chdir(tmp)
    session.run("jepa", "plugins", "list")
    session.run("jepa", "recipe", "check", "image_vith14")
    session.run("jepa", "pretrain", "quickstart", "--set", "train.steps=20", "--run-dir", "smoke-run")


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate docs/recipes.md from the schema."""
    session.install("-e", ".")
    with open("docs/recipes.md", "w") as f:
        session.run("jepa", "recipe", "reference", stdout=f)
