"""`python -m finetune --plan --gpus`: a GPU count, or NODESxGPUS for a multi-node launch (all its processes)."""

from click.testing import CliRunner

from finetune.cli import main

TINY = "configs/finetune/tiny-cpu.yaml"


def plan(gpus: str):
    return CliRunner().invoke(main, ["--config", TINY, "--plan", "--gpu-memory", "80GB", "--gpus", gpus])


def test_nodes_x_gpus_plans_all_processes_of_the_launch():
    two_nodes, eight = plan("2x4"), plan("8")
    assert two_nodes.exit_code == 0, two_nodes.output
    assert "8 x 80.0 GiB GPU, DDP" in eight.output or "8 x" in eight.output, eight.output
    assert two_nodes.output == eight.output


def test_a_bad_gpu_count_is_one_clear_error():
    for text in ("0", "2x", "x4", "2x0", "two"):
        result = plan(text)
        assert result.exit_code == 2 and "NODESxGPUS" in result.output, (text, result.output)
