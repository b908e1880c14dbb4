"""The adopting app's own ``blueprints`` package: the library must neither hide nor shadow it."""

from flask import Blueprint

pages = Blueprint("pages", __name__)


@pages.get("/pages/hello")
def hello() -> dict[str, str]:
    return {"from": __name__}
