"""The distribution: a PEP 420 namespace wheel with typed, explicit public surface."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import dotmac.communications as comms
from dotmac.communications import errors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from the source tree with hatchling."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("dotmac_communications-*.whl")
    return built


def test_wheel_is_a_namespace_package(wheel: Path) -> None:
    """The wheel ships dotmac/communications but no dotmac/__init__.py (PEP 420)."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "dotmac/__init__.py" not in names
    assert "dotmac/communications/__init__.py" in names
    assert "dotmac/communications/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_wheel_declares_console_script(wheel: Path) -> None:
    """The dotmac-comms command is an entry point of the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        entry = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        assert "dotmac-comms = dotmac.communications.cli:main" in zf.read(entry).decode()


def test_source_tree_has_no_dotmac_init() -> None:
    """src/dotmac stays a namespace so the legacy dotmac.* packages can share it."""
    assert not (ROOT / "src" / "dotmac" / "__init__.py").exists()


def test_version_comes_from_metadata() -> None:
    """__version__ is the installed distribution's version."""
    from importlib.metadata import version

    assert comms.__version__ == version("dotmac-communications")


def test_top_level_exports_are_explicit() -> None:
    """__all__ is exactly the public surface and every name resolves."""
    public = {
        name
        for name in dir(comms)
        if not name.startswith("_") and not isinstance(getattr(comms, name), types.ModuleType)
    }
    assert set(comms.__all__) - {"__version__"} == public
    for name in comms.__all__:
        assert getattr(comms, name) is not None


def test_error_tree() -> None:
    """Every library error derives from CommunicationsError; transient flags are right."""
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.CommunicationsError)
    assert issubclass(errors.ConfigurationError, ValueError)
    assert issubclass(errors.OperationTimeoutError, TimeoutError)
    assert errors.DeliveryError("x").transient
    assert not errors.PermanentDeliveryError("x").transient
    assert errors.is_transient(ConnectionResetError())
    assert not errors.is_transient(ValueError())
    assert errors.is_transient(errors.EventError("x", transient=True))
    with pytest.raises(ValueError, match="retry_after"):
        errors.RateLimitedError("x", retry_after=-1)


def test_import_has_no_side_effects() -> None:
    """Importing the package configures no logging, metrics or tracing providers."""
    code = (
        "import logging, dotmac.communications, dotmac.communications.config, "
        "dotmac.communications.observability, dotmac.communications.resilience\n"
        "from opentelemetry import trace, metrics\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
        "assert type(metrics.get_meter_provider()).__name__ == '_ProxyMeterProvider'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
