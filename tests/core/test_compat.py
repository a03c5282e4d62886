"""core.compat: Ray's private APIs in one place, with an error that names the Ray release."""

from __future__ import annotations

import pytest

from core import compat


def test_every_private_api_resolves_on_this_ray():
    for name in compat.PRIVATE_APIS:
        api = compat.ray_api(name)
        # classes we subclass, functions we call
        assert isinstance(api, type) or callable(api), name


def test_a_moved_api_names_itself_and_the_tested_release(monkeypatch):
    monkeypatch.setitem(compat.PRIVATE_APIS, "Gone", ("ray.data._internal.no_such_module", "Thing"))
    with pytest.raises(ImportError, match=r"no ray\.data\._internal\.no_such_module\.Thing .*tested with Ray 2\.60"):
        compat.ray_api("Gone")
