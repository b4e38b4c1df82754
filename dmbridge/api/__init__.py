"""The HTTP API platforms call, a thin layer over :class:`dmbridge.dms.DMService`."""

from .app import PREFIX, make_api_app

__all__ = ["PREFIX", "make_api_app"]
