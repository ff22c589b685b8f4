"""configurator.py: config files and --key=value overrides, typed by the dataclass; and the config/ files."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from configurator import ConfigError, explicit_values, parse_cli_explicit, parse_config
from train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    steps: int = 10
    rate: float = 0.5
    name: str = "run"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    limit: int | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def write(tmp_path, text: str, name="cfg.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_typed_overrides():
    assert parse_config(Example, []) == Example()
    config = parse_config(Example, ["--steps=3", "--rate=2", "--name=x=y", "--sizes=4096,8192", "--limit=7"])
    assert config == Example(steps=3, rate=2.0, name="x=y", sizes=(4096, 8192), limit=7)
    assert isinstance(config.rate, float)  # an int is fine for a float key, and becomes a float
    assert parse_config(Example, ["--limit=None", "--sizes="]) == Example(limit=None, sizes=())


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("0", False)]
)
def test_bool_forms(text, value):
    assert parse_config(Example, [f"--flag={text}"]).flag is value


def test_bare_flag_means_true():
    assert parse_config(Example, ["--flag"]).flag is True
    assert parse_config(TrainConfig, ["--sla"]).sla is True


def test_config_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "import math\n_scratch = 3\nsteps = 2 * _scratch\nrate = 1\nsizes = [4, 8]\nflag = True\n")
    config = parse_config(Example, [path, "--steps=1"])
    assert config == Example(steps=1, rate=1.0, sizes=(4, 8), flag=True)
    assert parse_config(Example, ["--steps=1", path]).steps == 6  # later arguments win


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stpes=3"], r"unknown config key 'stpes'; did you mean steps"),
        (["--steps=1.5"], r"'steps' expects int, got '1.5'"),
        (["--rate=fast"], r"'rate' expects float, got 'fast'"),
        (["--flag=maybe"], r"'flag' expects bool, got 'maybe'"),
        (["--sizes=4096,big"], r"'sizes' expects int, got 'big'"),
        (["--steps"], r"--steps needs a value: write --steps=VALUE"),
        (["--steps=-1"], r"steps must be >= 0"),
        (["missing_config.py"], r"cannot read config file 'missing_config.py'"),
    ],
)
def test_bad_arguments_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Example, argv)


def test_unknown_train_key_suggests_the_close_ones():
    with pytest.raises(ConfigError, match=r"'learning_rat'; did you mean learning_rate\?"):
        parse_config(TrainConfig, ["--learning_rat=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean sla_skip or sla\b"):
        parse_config(TrainConfig, ["--sla_skp=3"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stesp = 3\n", r"in .*cfg.py: unknown config key 'stesp'; did you mean steps"),
        ("steps = '3'\n", r"'steps' expects int, got '3' \(str\)"),
        ("flag = 1\n", r"'flag' expects bool, got 1"),
        ("sizes = [1, 'a']\n", r"'sizes' expects int, got 'a'"),
        ("steps = undefined_name\n", r"cfg.py' failed: NameError"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Example, [write(tmp_path, text)])


def test_explicit_keys_are_those_of_config_files_and_arguments(tmp_path):
    path = write(tmp_path, "steps = 4\nrate = 1\n")
    assert explicit_values(Example, [path, "--name=x", "--flag"]) == {
        "steps": 4,
        "rate": 1.0,
        "name": "x",
        "flag": True,
    }
    config, keys = parse_cli_explicit(Example, [path, "--steps=10"])
    assert config == Example(steps=10, rate=1.0) and keys == {"steps", "rate"}  # steps=10 is the default, yet given


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def run_train_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_rejects_unknown_and_mistyped_keys_with_exit_code_2():
    unknown = run_train_cli("--lerning_rate=1e-3")
    assert unknown.returncode == 2
    assert "unknown config key 'lerning_rate'; did you mean learning_rate?" in unknown.stderr
    mistyped = run_train_cli("--batch_size=eight")
    assert mistyped.returncode == 2 and "'batch_size' expects int, got 'eight'" in mistyped.stderr
    spaced = run_train_cli("--batch_size", "8")
    assert spaced.returncode == 2 and "write --batch_size=VALUE" in spaced.stderr


def test_help_lists_the_keys():
    result = run_train_cli("--help")
    assert result.returncode == 0 and "--sla_skip=9" in result.stdout and "--eval_block_sizes=()" in result.stdout


CONFIG_FILES = sorted((REPO / "config").glob("*.py"))


def test_all_configs_are_present():
    names = {path.name for path in CONFIG_FILES}
    for size in ("small", "medium"):
        for context in ("4k", "8k", "16k"):
            assert f"train_gpt2_{size}_{context}.py" in names
    assert "tiny_cpu.py" in names


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.name.startswith("train_gpt2")], ids=lambda p: p.name)
def test_gpu_configs_take_half_a_million_tokens_per_step(path):
    config = parse_config(TrainConfig, [str(path), "--sla"])
    assert config.sla
    assert config.gradient_accumulation_steps * config.batch_size * config.block_size == 524_288
    assert f"{config.block_size // 1024}k" in path.name
    assert config.gradient_accumulation_steps % 8 == 0  # runs unchanged on 1, 2, 4 or 8 GPUs
    assert config.n_layer > config.sla_skip  # --sla has skip heads


def test_tiny_cpu_config_has_skip_heads_with_sla():
    config = parse_config(TrainConfig, [str(REPO / "config" / "tiny_cpu.py"), "--sla"])
    assert config.device == "cpu" and config.sla_skip < config.n_layer
    assert round(config.sla_head_ratio * config.n_head) > 0
