"""Registered models: what a training job saved, made a model MLflow loads and serves
(``packaging``, with ``dnntrain_pyfunc`` as its loader) and registered as a version (``registration``)."""
