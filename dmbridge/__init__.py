"""dmbridge: direct conversations between other platforms and Matrix users."""

__version__ = "0.1.0"
