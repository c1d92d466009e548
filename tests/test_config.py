import pytest
import torch

from mesimp_compress.config import CompressConfig
from mesimp_compress.errors import ConfigError, KError


def test_defaults_validate_and_round_trip():
    cfg = CompressConfig()
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("k", [0, -3, 0.0, 1.5, -0.2, "ten", True, None, float("nan")])
def test_bad_k_is_a_typed_error_naming_the_value(k):
    with pytest.raises(KError, match="k"):
        CompressConfig(k=k)


def test_toml_keys_with_hyphens_and_a_compress_table(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[compress]\nk = 64\nprune-rate = 0.2\nbatches = [1, 4]\nmax_drop = 0.5\n')
    cfg = CompressConfig.from_toml(path)
    assert (cfg.k, cfg.prune_rate, cfg.batches, cfg.max_drop) == (64, 0.2, [1, 4], 0.5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("kk = 3\n", "unknown key 'kk'"),
        ("epochs = 'two'\n", "epochs must be an integer"),
        ("lr = -1\n", "lr must lie in"),
        ("mode = 'sparse'\n", "mode must be one of unified, per_example"),
        ("k = [\n", "malformed TOML"),
        ("batches = [0, 8]\n", "batches"),
        ("compensate = 'yes'\n", "compensate must be one of off, mean, linear"),
        ("opset = 3\n", "opset must be an integer >= 7"),
        ("sparse_update = true\noptimizer = 'adamw'\nweight_decay = 0.01\n",
         "adamw's decoupled weight decay"),
        ("opset = -1\n", "opset must be an integer >= 7"),
        ("opset = 99\n", "opset must be an integer <= "),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, match):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        CompressConfig.from_toml(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        CompressConfig.from_toml(tmp_path / "nope.toml")


def test_replace_validates():
    with pytest.raises(ConfigError, match="min_width"):
        CompressConfig().replace(min_width=0)
    assert CompressConfig().replace(k=12).k == 12


def test_a_torch_device_is_taken_as_its_name_and_the_metric_direction_is_a_bool():
    import torch

    assert CompressConfig(device=torch.device("cpu")).device == "cpu"
    assert CompressConfig.from_dict({"device": torch.device("cpu")}).device == "cpu"
    assert CompressConfig.from_dict({"greater-is-better": False}).greater_is_better is False
    with pytest.raises(ConfigError, match="greater_is_better must be true or false"):
        CompressConfig.from_dict({"greater_is_better": "no"})


def test_a_recipe_saved_with_a_byte_order_mark_reads(tmp_path):
    recipe = tmp_path / "bom.toml"
    recipe.write_bytes("\ufeffk = 8\n".encode())
    assert CompressConfig.from_toml(recipe).k == 8


@pytest.mark.parametrize("key", ["atol", "rtol", "lr", "distill", "max_drop"])
def test_infinite_numbers_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number, got inf"):
        CompressConfig(**{key: float("inf")})


def test_a_misspelt_keyword_is_a_config_error():
    """CompressConfig(windw=0.5) was the dataclass's TypeError, outside the one hierarchy."""
    with pytest.raises(ConfigError, match="unknown key 'windw'; valid keys: allow_residual"):
        CompressConfig(windw=0.5)
    assert CompressConfig(window=0.5).replace(k=3).k == 3


@pytest.mark.parametrize("key", ["lr", "weight_decay", "temperature", "distill", "layer_weight"])
def test_numbers_beyond_float32_are_refused(key):
    """lr 1e39 passed and failed in the first optimizer step with a RuntimeError traceback
    ('value cannot be converted to type float without overflow')."""
    with pytest.raises(ConfigError, match=f"{key} must lie in .*3.4028.*e\\+38\\], got 1e\\+39"):
        CompressConfig(**{key: 1e39})
    assert getattr(CompressConfig(**{key: 3e38}), key) == 3e38


@pytest.mark.parametrize("key", ["sparse_update", "sparse_bias", "allow_residual", "quantize"])
def test_on_off_settings_built_in_python_must_be_bools(key):
    """'no' is truthy: CompressConfig(sparse_update='no') once built a row-sparse optimizer."""
    with pytest.raises(ConfigError, match=f"{key} must be true or false, got 'no'"):
        CompressConfig(**{key: "no"})
    with pytest.raises(ConfigError, match="output_layer must be a module name or None"):
        CompressConfig(output_layer=3)


def test_a_key_given_twice_or_settings_that_are_no_mapping_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"prune_rate is given twice \(as 'prune-rate' and "):
        CompressConfig.from_dict({"prune-rate": 0.2, "prune_rate": 0.3})
    for values in (None, [("k", 1)]):
        with pytest.raises(ConfigError, match="must be a mapping of keys to values"):
            CompressConfig.from_dict(values)


def test_compress_validates_a_config_changed_after_it_was_built():
    import mesimp_compress as mc

    config = CompressConfig()
    config.window = 5.0
    with pytest.raises(ConfigError, match="window must lie in"):
        mc.compress(torch.nn.Linear(2, 2), [], [], config=config)
