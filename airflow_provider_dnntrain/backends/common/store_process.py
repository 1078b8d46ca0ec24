"""The served store's process: MLflow's basic-auth app under uvicorn, in one process.

``mlflow server --app-name basic-auth`` does the same in two: the command imports MLflow, sets the
store up and starts uvicorn, which imports it all again (4.6 s before the first answer on this 2-core
machine, against 2.4 s here) - while a replica's first ``mlflow`` call waits. The app is configured as
the command configures it: the store's URI in MLflow's server variables (the named constants, so a
renamed one fails at import rather than serving the wrong store), the tables created before serving.
The credential comes from the environment (``MLFLOW_AUTH_*``, set by :class:`StoreServer`).

Run: ``python -m airflow_provider_dnntrain.backends.common.store_process URI FD``, ``FD`` a socket
listening where the store is served (bound by :class:`StoreServer` as the job is submitted).
"""

from __future__ import annotations

import os
import socket
import sys


def main(uri: str, listener: socket.socket) -> None:
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR, REGISTRY_STORE_URI_ENV_VAR
    from mlflow.server.handlers import initialize_backend_stores

    os.environ.update(
        {BACKEND_STORE_URI_ENV_VAR: uri, REGISTRY_STORE_URI_ENV_VAR: uri, _MLFLOW_SGI_NAME.name: "uvicorn"}
    )
    initialize_backend_stores(uri, uri)

    import uvicorn

    config = uvicorn.Config("mlflow.server.auth:create_app", factory=True, workers=1)
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main(sys.argv[1], socket.socket(fileno=int(sys.argv[2])))
