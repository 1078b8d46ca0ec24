from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from airflow_provider_dnntrain import get_provider_info


def test_airflow_lists_the_provider(airflow_db):
    airflow = str(Path(sys.executable).with_name("airflow"))
    out = subprocess.run(
        [airflow, "providers", "list", "--output", "json"], capture_output=True, text=True, check=True
    ).stdout
    providers = {p["package_name"]: p for p in json.loads(out[out.index("[") :])}
    assert providers["airflow-provider-dnntrain"]["version"] == get_provider_info()["versions"][0]
