"""medge: edge device control and telemonitoring daemons for digital medicine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
