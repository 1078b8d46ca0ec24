"""Needs a package the base interpreter lacks (the job's environment adds it) and one it has."""

import importlib.metadata
import sys

import psutil  # the base interpreter's
import pyjokes  # noqa: F401

version = importlib.metadata.version("pyjokes")
print(f"pyjokes {version} psutil {psutil.__version__} python {sys.executable}", flush=True)
