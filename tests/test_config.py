from pathlib import Path

import pytest
import yaml

from ted_scale.config import ConfigError, record_invocation
from ted_scale.config.schema import RunConfig
from ted_scale.distill.methods import load_run_config

REPO = Path(__file__).resolve().parents[1]


def test_yaml_file_and_overrides_build_typed_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: distill\noptim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\n")
    config = load_run_config(
        path, ["optim.lr=3e-4", "student.layer_map=[0,1,2,3,4,5]", "output_dir=/x"]
    )
    assert isinstance(config, RunConfig)
    assert config.stage == "distill"
    assert config.optim.lr == 3e-4 and config.optim.betas == (0.8, 0.9)
    assert config.student.layer_map == [0, 1, 2, 3, 4, 5]
    assert config.output_dir == "/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ("distil.alpha_kd=1", "unknown key 'distil'; did you mean 'distill'"),
        ("stage=distil", "stage must be one of .*did you mean 'distill'"),
        ("batch.micro_batch_size=abc", "batch.micro_batch_size expects an integer, got 'abc'"),
        ("fused_loss=maybe", "fused_loss expects true or false"),
        ("optim.lr=-1", r"optim.lr must be > 0.0, got -1.0"),
        ("optim.warmup_ratio=1.5", r"optim.warmup_ratio must be <= 1.0"),
        ("optim.betas=[0.9]", "optim.betas expects 2 values"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be <= 3"),
        ("student.layer_map=[0,2]", "layer_map has 2 entries but student.n_layer is 6"),
        ("teacher.arch.n_embd=50", "teacher.arch: n_embd .50. must be divisible by n_head"),
        ("batch.global_batch_size=10", "must be a multiple of batch.micro_batch_size"),
        ("optim", "must look like key.subkey=value"),
        ("distill.divergence=kl", "distill.divergence must be one of 'forward_kl', .*got 'kl'"),
        ("distill.jsd_beta=1", r"distill.jsd_beta must be < 1.0, got 1"),
    ],
)
def test_each_kind_of_config_error_names_the_key_and_what_it_expects(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_run_config(tmp_path / "nope.yaml")


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=f"{path}: optim.lr expects a number"):
        load_run_config(path)


def test_resolved_config_round_trips_through_the_run_directory(tmp_path):
    config = load_run_config(None, ["method=kd", "optim.betas=[0.5, 0.6]"])
    path = record_invocation(config, tmp_path, resuming=False).path
    assert load_run_config(path) == config
    assert yaml.safe_load(path.read_text())["method"] == "kd"


def test_a_run_recorded_before_a_key_existed_resumes_while_that_key_keeps_its_default(tmp_path):
    """The model-family keys (teacher.arch.family, ...) are absent from older runs' config.yaml."""
    config = load_run_config(None, ["method=kd"])
    path = record_invocation(config, tmp_path, resuming=False).path
    older = yaml.safe_load(path.read_text())
    for key in ("family", "qkv_bias", "rope_theta"):
        del older["teacher"]["arch"][key]
    path.write_text(yaml.safe_dump(older))
    assert record_invocation(config, tmp_path, resuming=True).changes == {}
    changed = load_run_config(None, ["method=kd", "teacher.arch.family=llama"])
    with pytest.raises(ConfigError, match=r"teacher.arch.family: None -> 'llama'"):
        record_invocation(changed, tmp_path, resuming=True)


RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("study"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_run_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.arch.n_layer=-1", "teacher.arch: n_layer must be a positive integer, got -1"),
        ("teacher.arch.n_head=0", "teacher.arch: n_head must be a positive integer, got 0"),
        ("teacher.arch.n_embd=-64", "teacher.arch: n_embd must be a positive integer, got -64"),
        ("teacher.arch.vocab_size=-5", "vocab_size must be a positive integer, got -5"),
        ("teacher.arch.dropout=1.5", r"teacher.arch: dropout must be in \[0, 1\), got 1.5"),
        ("student.dropout=1.5", "student.dropout must be < 1.0, got 1.5"),
        ("teacher.arch.layer_norm_epsilon=-1", "layer_norm_epsilon must be > 0, got -1.0"),
        ("distill.temperature=1e-300", "distill.temperature must be >= 0.001, got 1e-300"),
        ("optim.lr=inf", "optim.lr expects a finite number, got 'inf'"),
        ("stage2.lr=.nan", "stage2.lr expects a finite number, got nan"),
    ],
)
def test_sizes_probabilities_temperatures_and_rates_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 1e-4\nseed: 2\n")
    with pytest.raises(ConfigError, match=f"{path}:4: key 'seed' is given twice .first on line 1"):
        load_run_config(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the config is empty"),
        (b"# only a comment\n", "the config is empty"),
        (b"seed: 1\n\xff\xfe\x00binary", "not a text config .byte 8 is not UTF-8"),
    ],
)
def test_empty_or_binary_config_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        load_run_config(path)


def test_yaml_aliases_expanding_past_the_bound_are_refused(tmp_path):
    lines = ["deepspeed:", "  extra:", "    a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):  # 10**9 values once expanded
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ConfigError, match=f"{path}: more than 100,000 values once its YAML aliases"
    ):
        load_run_config(path)


@pytest.mark.parametrize(
    ("overrides", "dp_size", "stage"),
    [
        ([], 1, 0),  # one data-parallel rank: ZeRO-1 would partition nothing
        ([], 2, 1),
        (["deepspeed.offload_optimizer=true"], 1, 1),  # offloading needs ZeRO
        (["deepspeed.zero_stage=1"], 1, 1),  # an explicit stage is kept
        (["deepspeed.zero_stage=0"], 8, 0),
    ],
)
def test_the_default_zero_stage_partitions_only_over_several_data_parallel_ranks(
    overrides, dp_size, stage
):
    from ted_scale.train.engine import deepspeed_config

    config = load_run_config(None, overrides)
    assert config.deepspeed.stage_at(dp_size) == stage
    batch = ["batch.global_batch_size=16", "batch.micro_batch_size=2"]
    config = load_run_config(None, [*overrides, *batch])
    assert deepspeed_config(config, dp_size)["zero_optimization"]["stage"] == stage
