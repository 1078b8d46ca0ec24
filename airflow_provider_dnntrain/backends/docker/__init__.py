"""The Docker backend: every replica a container of the run on one Docker daemon, on a network of the
run where replicas reach each other by name (``launcher.py``, ``containers.py``, ``job.py``)."""
