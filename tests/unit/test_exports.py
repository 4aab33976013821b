"""Each public package's __all__ is exactly its public surface, and every name resolves."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = [
    "dotmac.communications",
    "dotmac.communications.errors",
    "dotmac.communications.config",
    "dotmac.communications.resilience",
    "dotmac.communications.observability",
    "dotmac.communications.testing",
    "dotmac.communications.events",
    "dotmac.communications.events.backends",
    "dotmac.communications.notifications",
    "dotmac.communications.websockets",
    "dotmac.communications.websockets.backends",
    "dotmac.communications.websockets.asgi",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_the_public_surface(name: str) -> None:
    """A package's public re-exports, or a module's own public definitions, are __all__."""
    module = importlib.import_module(name)
    exported = set(module.__all__)
    is_package = hasattr(module, "__path__")

    def counts(value: object) -> bool:
        origin = getattr(value, "__module__", name) or name
        if isinstance(value, types.ModuleType):
            return False
        return origin.startswith("dotmac.") if is_package else origin == name

    public = {
        attr for attr, value in vars(module).items() if not attr.startswith("_") and counts(value)
    }
    assert public - exported == set(), f"public but not in __all__: {public - exported}"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"
    assert len(module.__all__) == len(exported), "duplicates in __all__"
