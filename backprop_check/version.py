"""The package's version, in one place (the package, the CLI and the HTML report say it)."""
__version__ = "0.1.0"
