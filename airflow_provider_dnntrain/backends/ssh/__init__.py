"""The SSH backend: replicas detached on hosts named by Airflow SSH connections, started and watched by
a small agent shipped to each host."""
