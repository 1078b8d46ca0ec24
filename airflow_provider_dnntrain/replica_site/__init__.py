"""What runs first in every replica's Python processes (``sitecustomize``), and Azure ML's ``Run``."""
