"""Config loading: every problem in one message, overrides, paths, round trips, docs, and no code execution."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from xlbake.config import FieldDoc, config_hash, describe, dump_yaml, load_config, to_dict
from xlbake.errors import ConfigError


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-5
    """Learning rate."""
    name: Literal["adamw", "adamw8bit", "lion"] = "adamw"
    """Optimizer name."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps must be >= 0")


@dataclass(frozen=True)
class DataSection:
    folder: Path
    """Dataset folder in kohya layout."""
    extra_folders: tuple[Path, ...] = ()
    """More dataset folders."""
    caption_ext: str = ".txt"
    """Caption file extension."""
    repeats: dict[str, int] = field(default_factory=dict)
    """Repeats per folder name."""
    options: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Free-form loader options."""


@dataclass(frozen=True)
class RootConfig:
    data: DataSection
    """Training data."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""
    steps: int = 100
    """Optimizer steps."""
    use_ema: bool = False
    """Keep an EMA of the weights."""
    dims: tuple[int, ...] = (16,)
    """LoRA ranks to extract."""
    resume_from: Path | None = None
    """Checkpoint folder to resume from."""
    run_dir: Path = Path("runs/default")
    """Run folder."""
    mode: Mode = Mode.FAST
    """Speed/precision trade-off."""
    config_version: int = 2
    """Config format version."""

    def __post_init__(self) -> None:
        if self.use_ema and self.steps < 10:
            raise ConfigError("use_ema needs steps >= 10")


def write(folder: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(exc: pytest.ExceptionInfo) -> list[str]:
    lines = str(exc.value).splitlines()
    return [line.strip() for line in lines[1:]] if len(lines) > 1 else lines


def test_every_problem_in_one_message_with_file_line_and_key(tmp_path):
    path = write(
        tmp_path,
        "data:\n"  # 1
        "  folder: imgs\n"  # 2
        "  caption_extt: .cap\n"  # 3
        "optim:\n"  # 4
        "  lr: fast\n"  # 5
        "  name: adamw8bitt\n"  # 6
        "steps: 1.5\n"  # 7
        "use_ema: 'yes'\n"  # 8
        "dims: [8, x]\n",  # 9
    )
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, path)
    assert str(exc.value).startswith("6 config problems:")
    assert problems(exc) == [
        f"{path}:3: data.caption_extt: unknown key; did you mean 'caption_ext'?",
        f'{path}:5: optim.lr: expected a number, got str "fast"',
        f'{path}:6: optim.name: str "adamw8bitt" is not one of "adamw", "adamw8bit", "lion"; did you mean "adamw8bit"?',
        f"{path}:7: steps: expected an integer, got float 1.5",
        f'{path}:8: use_ema: expected true or false, got str "yes"',
        f'{path}:9: dims[1]: expected an integer, got str "x"',
    ]


def test_missing_required_and_wrong_section_type_reported_together(tmp_path):
    path = write(tmp_path, "optim: 3\nsteps: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, path)
    assert problems(exc) == [
        f"{path}: data: missing required key (DataSection)",
        f"{path}:1: optim: expected a section of keys (OptimSection), got int 3",
    ]


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"zzz: unknown key; valid keys: lr, name, betas, warmup_steps"):
        load_config(RootConfig, data={"data": {"folder": "d"}, "optim": {"zzz": 1}})


def test_numeric_strings_and_ints_accepted_for_numbers(tmp_path):
    path = write(tmp_path, "data: {folder: d}\noptim: {lr: 1e-6, betas: [1, '0.99'], warmup_steps: 1e3}\nsteps: '7'\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-6"  # why float fields must take strings
    cfg = load_config(RootConfig, path)
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (1.0, 0.99)
    assert cfg.optim.warmup_steps == 1000 and isinstance(cfg.optim.warmup_steps, int)
    assert cfg.steps == 7


def test_bool_and_str_fields_are_strict():
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, data={"data": {"folder": "d", "caption_ext": 5}, "use_ema": 1, "steps": True})
    assert problems(exc) == [
        "<config>: data.caption_ext: expected a string, got int 5; quote it in YAML",
        "<config>: steps: expected an integer, got bool true",
        "<config>: use_ema: expected true or false, got int 1",
    ]
    assert load_config(RootConfig, data={"data": {"folder": "d"}, "use_ema": True, "steps": 10}).use_ema is True


def test_every_bad_entry_of_a_mapping_is_reported():
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, data={"data": {"folder": "d", "repeats": {"a": 1.5, "b": 2, 3: 1, "c": "x"}}})
    assert problems(exc) == [
        "<config>: data.repeats.a: expected an integer, got float 1.5",
        "<config>: data.repeats.3: expected a string, got int 3; quote it in YAML",
        '<config>: data.repeats.c: expected an integer, got str "x"',
    ]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  folder: d\noptim: [1, 2\nsteps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:\d+: invalid YAML: ") as exc:
        load_config(RootConfig, path)
    assert "\n" not in str(exc.value)


def test_duplicate_keys_refused(tmp_path):
    path = write(tmp_path, "steps: 1\ndata: {folder: d}\nsteps: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: steps: duplicate key"):
        load_config(RootConfig, path)


def test_recursive_and_exponential_aliases_do_not_hang(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, write(tmp_path, bomb + "data: {folder: d}\n"))
    assert "a: unknown key" in str(exc.value) and "j: unknown key" in str(exc.value)
    with pytest.raises(ConfigError, match=r"dims\[0\]: expected an integer, got a list"):
        load_config(RootConfig, write(tmp_path, "data: {folder: d}\ndims: &d [*d]\n"))


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:subprocess.check_output [['touch', '{marker}']]",
        "!!python/name:os.system",
    ],
)
def test_yaml_python_tags_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"data: {{folder: d}}\nsteps: {payload.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2:\d+: invalid YAML: .*could not determine a constructor"):
        load_config(RootConfig, path)
    with pytest.raises(ConfigError, match=r"^--set: steps: cannot parse the value"):
        load_config(RootConfig, data={"data": {"folder": "d"}}, overrides=[f"steps={payload.format(marker=marker)}"])
    assert not marker.exists()


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the config \(No such file or directory\)"):
        load_config(RootConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"the top level must be a mapping of keys, got a list"):
        load_config(RootConfig, write(tmp_path, "- 1\n- 2\n"))


def test_overrides_parsed_as_yaml_and_applied_before_validation(tmp_path):
    path = write(tmp_path, "data: {folder: d}\noptim: {lr: 1e-4}\n")
    cfg = load_config(
        RootConfig,
        path,
        ["optim.lr=2e-5", "optim.betas=[0.8, 0.95]", "dims=[8, 16]", "data.repeats.cats=3", "use_ema=true"],
    )
    assert cfg.optim == OptimSection(lr=2e-5, betas=(0.8, 0.95))
    assert cfg.dims == (8, 16) and cfg.data.repeats == {"cats": 3} and cfg.use_ema is True
    assert load_config(RootConfig, path, ["resume_from=null"]).resume_from is None


def test_bad_overrides_reported_with_file_problems(tmp_path):
    path = write(tmp_path, "data: {folder: d}\nstepz: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, path, ["optim.lrr=1", "steps.x=1", "novalue", "optim.lr=abc"])
    assert problems(exc) == [
        "--set: optim.lrr: unknown key; did you mean 'lr'?",
        "--set: steps: is a int, not a section; cannot set steps.x",
        "--set: novalue: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-5",
        f"{path}:2: stepz: unknown key; did you mean 'steps'?",
        '--set: optim.lr: expected a number, got str "abc"',
    ]


def test_paths_resolve_against_config_folder_and_overrides_against_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "configs" / "finetune"
    sub.mkdir(parents=True)
    path = write(sub, "data:\n  folder: ../../data/cats\n  extra_folders: more\nresume_from: /abs/ckpt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(RootConfig, path)
    assert cfg.data.folder == tmp_path / "data" / "cats"
    assert cfg.data.extra_folders == (sub / "more",)  # a scalar where a list is expected: one item
    assert cfg.resume_from == Path("/abs/ckpt")
    cfg = load_config(RootConfig, path, ["data.folder=runs/x", "resume_from=~/ckpt"])
    assert cfg.data.folder == elsewhere / "runs" / "x"
    assert cfg.resume_from == Path.home() / "ckpt"
    assert load_config(RootConfig, data={"data": {"folder": "rel"}}).data.folder == elsewhere / "rel"
    assert cfg.run_dir == elsewhere / "runs" / "default"  # a relative default is relative to where you run


def test_post_init_checks_collected_with_section_prefix(tmp_path):
    path = write(tmp_path, "data: {folder: d}\noptim: {warmup_steps: -1}\nsteps: 2\nuse_ema: true\nstepz: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, path)
    assert problems(exc) == [
        f"{path}:5: stepz: unknown key; did you mean 'steps'?",
        f"{path}:2: optim: warmup_steps must be >= 0",
    ]
    fixed = write(tmp_path, "data: {folder: d}\nsteps: 2\nuse_ema: true\n", name="fixed.yaml")
    with pytest.raises(ConfigError, match=rf"^{fixed}: use_ema needs steps >= 10$"):
        load_config(RootConfig, fixed)
    assert load_config(RootConfig, fixed, ["steps=10"]).use_ema is True


def test_config_version_newer_than_code_is_refused_alone(tmp_path):
    path = write(tmp_path, "config_version: 3\nnew_option: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, path)
    assert str(exc.value) == (
        f"{path}:1: config_version: 3 is newer than this xlbake understands (2); upgrade xlbake or rewrite the config"
    )
    assert load_config(RootConfig, data={"config_version": 1, "data": {"folder": "d"}}).config_version == 1


@pytest.mark.parametrize("version", [0, -1])
def test_config_version_below_one_is_refused_with_the_other_problems(version):
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, data={"config_version": version, "stepz": 1})
    assert problems(exc) == [
        f"<config>: config_version: {version} is not supported (this xlbake reads 1 to 2)",
        "<config>: stepz: unknown key; did you mean 'steps'?",
        "<config>: data: missing required key (DataSection)",
    ]


def _stage_config_cases() -> list[tuple[type, dict]]:
    from extract.config import ExtractConfig
    from finetune.captions import CaptionConfig
    from finetune.config import FinetuneConfig, LogConfig, OptimConfig, PrecisionConfig, SampleConfig, TrainConfig
    from finetune.data import DataConfig
    from finetune.objective import LossConfig, NoiseConfig
    from resize.config import ResizeConfig
    from xlbake.batch.concepts import ConceptConfig

    return [
        (CaptionConfig, {"dropout_rate": 2.0}),
        (DataConfig, {"bucket_step": 7}),
        (NoiseConfig, {"min_timestep": 5, "max_timestep": 5}),
        (LossConfig, {"min_snr_gamma": 0.0}),
        (TrainConfig, {"epochs": 0}),
        (OptimConfig, {"unet_lr": -1.0}),
        (SampleConfig, {"width": 7}),
        (LogConfig, {"every_steps": 0}),
        (FinetuneConfig, {"precision": PrecisionConfig(vae="fp16")}),
        (ExtractConfig, {"dim": (0,)}),
        (ResizeConfig, {"rank": (0,)}),
        (ConceptConfig, {"datasets": (), "preset": "x"}),
    ]


@pytest.mark.parametrize(
    ("cls", "kwargs"), _stage_config_cases(), ids=lambda v: v.__name__ if isinstance(v, type) else "bad"
)
def test_every_stage_config_check_raises_config_error(cls, kwargs):
    """Not ValueError: only XlbakeErrors become one CLI line, and load_config collects exactly those."""
    with pytest.raises(ConfigError):
        cls(**kwargs)


@pytest.mark.parametrize("module", ["extract.config:ExtractConfig", "resize.config:ResizeConfig"])
def test_stage_config_version_is_checked_by_the_loader(module):
    import importlib

    path, name = module.split(":")
    cls = getattr(importlib.import_module(path), name)
    with pytest.raises(ConfigError, match=r"config_version: 0 is not supported \(this xlbake reads 1\)"):
        load_config(cls, data={"config_version": 0})


def test_union_keeps_exact_types_and_reads_numeric_strings_in_declared_order():
    options = {"a": 3, "b": 0.5, "c": "1e-6", "d": True, "e": "cosine"}
    cfg = load_config(RootConfig, data={"data": {"folder": "d", "options": options}})
    assert cfg.data.options == {"a": 3, "b": 0.5, "c": 1e-6, "d": True, "e": "cosine"}
    assert [type(v) for v in cfg.data.options.values()] == [int, float, float, bool, str]
    with pytest.raises(ConfigError, match=r"data.options.x: expected float \| int \| str \| bool, got a list"):
        load_config(RootConfig, data={"data": {"folder": "d", "options": {"x": [1]}}})


def test_literal_enum_and_optional_fields():
    base = {"data": {"folder": "d"}}
    cfg = load_config(RootConfig, data={**base, "mode": "exact", "resume_from": None})
    assert cfg.mode is Mode.EXACT and cfg.resume_from is None
    with pytest.raises(ConfigError, match=r'mode: str "exakt" is not one of "fast", "exact"; did you mean "exact"\?'):
        load_config(RootConfig, data={**base, "mode": "exakt"})
    with pytest.raises(ConfigError, match=r"optim.betas: expected a list of 2 items \(\[float, float\]\), got 3"):
        load_config(RootConfig, data={**base, "optim": {"betas": [0.9, 0.99, 0.999]}})


def test_dump_yaml_round_trips_and_hash_tracks_values(tmp_path):
    cfg = load_config(
        RootConfig,
        write(tmp_path, "data: {folder: d, repeats: {a: 2}}\ndims: [4, 8]\nmode: exact\noptim: {lr: 1e-7}\n"),
    )
    plain = to_dict(cfg)
    assert plain["data"]["folder"] == str(tmp_path / "d") and plain["dims"] == [4, 8] and plain["mode"] == "exact"
    text = dump_yaml(cfg)
    moved = write(tmp_path / "..", text, name="moved.yaml")  # absolute paths: the copy loads the same anywhere
    assert load_config(RootConfig, moved) == cfg
    assert load_config(RootConfig, data=yaml.safe_load(text)) == cfg
    assert config_hash(cfg) == config_hash(load_config(RootConfig, moved))
    assert config_hash(cfg) != config_hash(load_config(RootConfig, moved, ["optim.lr=2e-7"]))
    defaults = load_config(RootConfig, data={"data": {"folder": "d"}})
    assert load_config(RootConfig, data=yaml.safe_load(dump_yaml(defaults))) == defaults


def test_describe_finds_every_field_and_its_doc():
    docs = {d.key: d for d in describe(RootConfig)}
    assert list(docs) == [
        "data",
        "data.folder",
        "data.extra_folders",
        "data.caption_ext",
        "data.repeats",
        "data.options",
        "optim",
        "optim.lr",
        "optim.name",
        "optim.betas",
        "optim.warmup_steps",
        "steps",
        "use_ema",
        "dims",
        "resume_from",
        "run_dir",
        "mode",
        "config_version",
    ]
    assert all(d.doc for d in docs.values())
    assert docs["optim.lr"] == FieldDoc("optim.lr", "float", "1e-05", "Learning rate.")
    assert docs["data.folder"] == FieldDoc("data.folder", "path", "required", "Dataset folder in kohya layout.")
    assert docs["optim.name"].type == '"adamw" | "adamw8bit" | "lion"'
    assert docs["resume_from"].type == "path | null" and docs["resume_from"].default == "null"
    assert docs["dims"].type == "list[int]" and docs["dims"].default == "[16]"
    assert docs["data"].type == "section"


@dataclass(frozen=True)
class PartlyDocumented:
    documented: int = 1
    """Has a doc."""
    bare: int = 2
    after_comment: str = "x"  # a comment is not a doc
    """Doc of after_comment."""


def test_describe_reports_undocumented_fields():
    assert [d.key for d in describe(PartlyDocumented) if not d.doc] == ["bare"]


def test_unquoted_yaml_no_is_taken_as_the_literal_choice_it_spells():
    @dataclass(frozen=True)
    class Precision:
        mixed: Literal["no", "fp16", "bf16"] = "fp16"
        """Mixed precision."""

    assert load_config(Precision, overrides=["mixed=no"]).mixed == "no"
    assert load_config(Precision, data={"mixed": False}).mixed == "no"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Precision, data={"mixed": True})
