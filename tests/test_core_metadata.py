"""tdm_core.metadata through real safetensors files, and tdm_core's independence from its hosts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tdm_core.metadata import TDMInfo

ROOT = Path(__file__).resolve().parents[1]


def write_lora(path: Path, metadata: dict[str, str]) -> Path:
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(path), metadata=metadata)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_tdm_info_round_trips_through_a_safetensors_header(tmp_path):
    info = TDMInfo(
        num_steps=4, grid=[999, 856, 665, 399], total_steps=900, prediction_type="v_prediction", base_family="sd15",
        base_hash="ab" * 32, teacher_cfg=4.5, distance="huber_norm", huber_c=0.0346, lora_rank=16, lora_alpha=8.0,
        recommended_strength=0.125, training_steps=500, k_choices=[1, 2, 4], flow_shift=1.88,
    )
    path = write_lora(tmp_path / "tdm.safetensors", {"format": "pt", **info.to_safetensors_metadata()})
    metadata = read_metadata(path)
    assert all(isinstance(v, str) for v in metadata.values())  # safetensors headers hold strings only
    assert TDMInfo.from_safetensors_metadata(metadata) == info


def test_defaults_round_trip_and_unknown_tdm_keys_are_ignored(tmp_path):
    metadata = {**TDMInfo().to_safetensors_metadata(), "tdm.from_a_future_version": json.dumps({"x": 1})}
    assert TDMInfo.from_safetensors_metadata(read_metadata(write_lora(tmp_path / "a.safetensors", metadata))) == TDMInfo()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt", "ss_network_dim": "16", "ss_network_alpha": "8"}])
def test_plain_lora_metadata_gives_none(tmp_path, metadata):
    if metadata:
        metadata = read_metadata(write_lora(tmp_path / "plain.safetensors", metadata))
    assert TDMInfo.from_safetensors_metadata(metadata) is None


def test_bad_json_is_a_clear_error_naming_the_key():
    metadata = {**TDMInfo().to_safetensors_metadata(), "tdm.grid": "[999, 856,"}
    with pytest.raises(ValueError, match=r"tdm\.grid='\[999, 856,' is not valid JSON: re-export"):
        TDMInfo.from_safetensors_metadata(metadata)


@pytest.mark.parametrize(
    "key,raw,expected",
    [("num_steps", '"four"', "an integer"), ("grid", "[999, \"late\"]", "a list of numbers"), ("k_choices", "[1, 2.5]", "a list of integers"), ("teacher_cfg", '"high"', "a number"),
     ("huber_c", '"auto"', "a number or null"), ("base_family", "15", "a string")],
)
def test_wrong_kind_of_value_is_a_clear_error(key, raw, expected):
    metadata = {**TDMInfo().to_safetensors_metadata(), f"tdm.{key}": raw}
    with pytest.raises(ValueError, match=f"tdm.{key}=.* should be {expected}"):
        TDMInfo.from_safetensors_metadata(metadata)


def test_numbers_written_as_integers_are_accepted_where_floats_are_expected():
    metadata = {**TDMInfo().to_safetensors_metadata(), "tdm.teacher_cfg": "2", "tdm.huber_c": "null"}
    info = TDMInfo.from_safetensors_metadata(metadata)
    assert info.teacher_cfg == 2 and info.huber_c is None


def test_tdm_core_imports_neither_comfy_nor_diffusers():
    code = (
        "import sys, tdm_core, tdm_core.training, tdm_core.metadata, tdm_core.samplers, tdm_core.grids\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'diffusers', 'peft', 'transformers', 'accelerate', 'nodes'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"tdm_core pulled in host modules: {result.stdout}"
