"""What code ran: the package version and, in a checkout, the git commit (catalog runs and MLflow runs record it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["code_version", "git_commit", "package_version"]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dax")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The git commit of the code that runs, with '+dirty' for uncommitted changes; None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():       # an installed package, even one inside some other checkout
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def code_version() -> str:
    """'dax <package version> (<commit>)': what the catalog's runs and the MLflow runs record."""
    package = package_version()
    commit = git_commit()
    return f"dax {package}" + (f" ({commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''})" if commit else "")
