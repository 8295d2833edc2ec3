"""The OpenAPI document describes every HTTP route the app serves."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Mount, Route

from tidings.settings import Settings
from tidings.web.app import create_app
from tidings.web.openapi import openapi_document


def test_every_route_is_in_the_openapi_document(tmp_path: Path) -> None:
    app = create_app(Settings(db=f"sqlite:///{tmp_path / 'x.db'}", jwt_key="k" * 32))
    paths = openapi_document("test")["paths"]
    assert isinstance(paths, dict)
    for route in app.app.routes:
        if isinstance(route, Mount):
            continue  # static files
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        assert path in paths, f"{path} is not in openapi.json"
        documented = {m.upper() for m in paths[path]}
        served = (route.methods or set()) - {"HEAD", "OPTIONS"}
        assert served <= documented, f"{path}: {served - documented} undocumented"
