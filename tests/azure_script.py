"""What tests/scripts/azure_style.py (a script written for Azure ML) prints, checked."""

from __future__ import annotations


def assert_ran_as_azure_ml_script_offline(lines) -> None:
    """tests/scripts/azure_style.py found azureml.core.Run; with no tracking run it is Azure's offline run."""
    text = "\n".join(line.text for line in lines)
    assert "azure run OfflineRun_" in text and "same_class=True" in text
    assert "Attempted to log_metric ('accuracy', 0.5) on an offline run" in text
    assert "register_model('azure-style-model', 'outputs/model.pkl') skipped: offline run" in text
