"""The HTTP API platforms call, a thin layer over :class:`dmbridge.dms.DMService`."""

from .app import PREFIX, api_app

__all__ = ["PREFIX", "api_app"]
