"""What several backends share, below all of them: the reaper, the line reader and redaction, free
ports, the per-host cache, environments, GPU checks and the replicas' contract. Nothing here imports a
backend."""
