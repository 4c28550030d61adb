"""The launch's DeepSpeed settings: one model read alike from an accelerate YAML, a DeepSpeed JSON and the launch's
own plugin; unreadable files are one-line input errors."""

import json

import pytest

from finetune.launch import ZeroSettings, read_accelerate_config, settings_of_config
from xlbake.errors import InputError

DEEPSPEED_JSON = {
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    "gradient_clipping": 0.5,
    "gradient_accumulation_steps": "auto",
    "train_micro_batch_size_per_gpu": 2,
}


def test_a_deepspeed_json_named_by_the_accelerate_yaml_is_read(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(DEEPSPEED_JSON))
    (tmp_path / "launch.yaml").write_text(
        "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n"
    )
    expected = ZeroSettings(3, "cpu", 0.5, None, 2, offload_params="cpu")
    assert read_accelerate_config(tmp_path / "launch.yaml") == (2, expected)
    assert expected.optimizer_on_cpu and expected.params_on_cpu
    assert settings_of_config(DEEPSPEED_JSON) == expected  # what the launch reads from DeepSpeedPlugin's config


def test_accelerate_yaml_keys_and_a_plain_launch(tmp_path):
    yaml_file = tmp_path / "launch.yaml"
    yaml_file.write_text(
        "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 1\n  offload_optimizer_device: nvme\n"
        "  gradient_accumulation_steps: 4\n  gradient_clipping: auto\n"
    )
    processes, zero = read_accelerate_config(yaml_file)
    assert (processes, zero) == (1, ZeroSettings(1, "nvme", None, 4, None))
    assert not zero.optimizer_on_cpu  # NVMe: not in host RAM
    yaml_file.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    assert read_accelerate_config(yaml_file) == (4, None)


def test_unreadable_launch_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="accelerate config"):
        read_accelerate_config(tmp_path / "missing.yaml")
    launch = "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: x\n"
    (tmp_path / "launch.yaml").write_text(launch)
    (tmp_path / "x").write_text("{not json")
    with pytest.raises(InputError, match="DeepSpeed config"):
        read_accelerate_config(tmp_path / "launch.yaml")
