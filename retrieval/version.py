"""The package version, from its installed metadata ("0.0.0" when run from a bare source tree).

Imports nothing of the application, so that any module may use it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("fundus2video")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"
