"""The local backend, the embedded default: every replica a process on the Airflow worker's host, each
under its own reaper."""
