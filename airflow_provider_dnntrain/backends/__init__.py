"""Where jobs run: one package per backend (``local``, ``ssh``, ``kubernetes``) behind the interface in
``base.py``, and ``common/`` for what several of them share."""
