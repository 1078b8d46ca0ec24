"""The Kubernetes backend: every replica a pod (or a Kubeflow job's pod), reached through the
cncf-kubernetes provider's hooks."""
