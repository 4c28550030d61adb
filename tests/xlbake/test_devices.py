"""The one device resolver: auto follows what torch sees, a device the machine lacks is one ConfigError."""

import pytest
import torch

from extract.config import ExtractConfig
from extract.layers import FactorSettings
from xlbake.devices import resolve_device
from xlbake.errors import ConfigError


def test_auto_is_the_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_missing_or_unknown_devices_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda:1 is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_extract_runs_where_auto_points_by_default(monkeypatch):
    """extract's default device is auto, so its SVDs (and a calibration pass) run on the GPU of a GPU box."""
    assert ExtractConfig().device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert FactorSettings.from_config(ExtractConfig()).device == torch.device("cpu")
