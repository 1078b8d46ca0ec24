"""Saves a small TorchScript model and its input example in outputs/model, as a training script
would (tests of registration and serving). Usage: tiny_model.py [SCALE] - the model's outputs are its
inputs' sums times SCALE, so a test knows every prediction."""

import json
import os
import sys
from pathlib import Path

import torch


class Scaled(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, rows):
        return rows.sum(dim=1, keepdim=True) * self.scale


folder = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs")) / "model"
folder.mkdir(parents=True, exist_ok=True)
torch.jit.script(Scaled(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)).save(folder / "model.pt")
(folder / "input_example.json").write_text(json.dumps([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]]))
if os.environ.get("MLFLOW_RUN_ID"):  # its score, for a deployment's quality gate
    import mlflow

    mlflow.log_metric("score", float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
print("saved", folder / "model.pt", flush=True)
