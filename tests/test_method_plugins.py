"""The merge-method interface as an extension point: a method defined in one place (here, inside the test)
runs through the Python API, the CLI (its flags generated from its parameter model) and a YAML config;
options that the chosen method does not take are errors that name the methods taking them."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from sstmerge import ConfigError, MethodParams, TaskArithmeticMethod, merge_utility_safety, register_method
from sstmerge.cli.main import cli, expand_greedy
from sstmerge.merge.method import METHODS


def run(args):
    return CliRunner().invoke(cli, expand_greedy(list(map(str, args))), catch_exceptions=False)


@pytest.fixture
def toy_method():
    """A plugin method: rescales the utility coefficients and the safety weights (it transforms *every* input)."""

    @register_method
    class Rescale(TaskArithmeticMethod):
        """Task arithmetic with every utility coefficient × utility_factor and the safety weight × safety_factor."""

        name = "toy_rescale"

        class Params(MethodParams):
            utility_factor: float = Field(1.0, description="multiplies every c_i")
            safety_factor: float = Field(0.5, gt=0, description="multiplies every w^m")

        def transform(self, inputs, options, ctx):
            p = options.params
            new = inputs.replace(coefficients=tuple(p.utility_factor * c for c in inputs.coefficients),
                                 safety_weights={m: p.safety_factor * w for m, w in inputs.safety_weights.items()})
            return new, {"utility_factor": p.utility_factor, "safety_factor": p.safety_factor}

    yield Rescale
    METHODS.unregister("toy_rescale")


@pytest.fixture
def pair(adapter_factory):
    return adapter_factory(targets=("q_proj", "v_proj")), adapter_factory(targets=("q_proj", "k_proj"))


def weights_bytes(folder):
    return (folder / "adapter_model.safetensors").read_bytes()


def test_a_plugin_method_runs_through_api_cli_and_yaml(tiny_base, tmp_path, toy_method, pair):
    u, s = pair
    # the reference: direct with the same effective weights
    merge_utility_safety(tiny_base, [u], s, tmp_path / "ref", mode="direct", utility_weights=[0.5], safety_weight=0.25)
    # Python API
    api = merge_utility_safety(tiny_base, [u], s, tmp_path / "api", mode="toy_rescale", utility_factor=0.5,
                               safety_factor=0.25)
    assert api.report["method"] == {"name": "toy_rescale", "utility_factor": 0.5, "safety_factor": 0.25}
    assert weights_bytes(tmp_path / "api") == weights_bytes(tmp_path / "ref")
    # CLI: the method's flags exist because it is registered
    res = run(["-q", "merge", "--base", tiny_base, "--utility", u, "--safety", s, "--mode", "toy_rescale",
               "--utility-factor", "0.5", "--safety-factor", "0.25", "--out", tmp_path / "cli"])
    assert res.exit_code == 0, res.output
    assert weights_bytes(tmp_path / "cli") == weights_bytes(tmp_path / "ref")
    # YAML config, and the merge_config.yaml it writes re-runs it
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(tiny_base), "utility": [str(u)], "safety": str(s),
                                   "mode": "toy_rescale", "utility_factor": 0.5, "safety_factor": 0.25}))
    assert run(["-q", "merge", "--config", cfg, "--out", tmp_path / "yaml"]).exit_code == 0
    assert weights_bytes(tmp_path / "yaml") == weights_bytes(tmp_path / "ref")
    again = run(["-q", "merge", "--config", tmp_path / "yaml" / "merge_config.yaml", "--out", tmp_path / "again"])
    assert again.exit_code == 0, again.output
    assert weights_bytes(tmp_path / "again") == weights_bytes(tmp_path / "ref")
    # listed with its parameters
    listing = run(["methods", "toy_rescale"]).stdout
    assert "toy_rescale" in listing and "--utility-factor" in listing and "--safety-factor" in listing


def test_a_plugin_parameter_is_refused_for_other_methods(tiny_base, tmp_path, toy_method, pair):
    u, s = pair
    res = run(["-q", "merge", "--base", tiny_base, "--utility", u, "--safety", s, "--safety-factor", "0.3",
               "--out", tmp_path / "m"])
    assert res.exit_code == 2 and "'safety_factor' belongs to method(s) toy_rescale, not 'direct'" in res.stderr
    with pytest.raises(ConfigError, match="method 'toy_rescale': safety_factor: Input should be greater than 0"):
        merge_utility_safety(tiny_base, [u], s, None, mode="toy_rescale", safety_factor=0.0)


def test_register_method_checks_its_class():
    with pytest.raises(TypeError):
        register_method(object)  # type: ignore[arg-type]

    class NoName(TaskArithmeticMethod):
        name = ""

    with pytest.raises(TypeError, match="sets a name"):
        register_method(NoName)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(METHODS.get("direct"))


@pytest.mark.parametrize("mode, key, value, needle", [
    ("ties", "residual_ratio", 0.2, "'residual_ratio' belongs to method(s) fisher_mask, residual, not 'ties'"),
    ("residual", "density", 0.5, "'density' belongs to method(s) dare_linear, dare_ties, magnitude, ties"),
    ("direct", "k", 5, "'k' belongs to method(s) fisher_mask, layerwise, protect, residual"),
    ("direct", "max_samples", 8, "configures the Fisher pass of complement, fisher_mask, layerwise, protect, residual"),
    ("dare_linear", "majority_sign_method", "frequency", "belongs to method(s) dare_ties, ties"),
    ("residual", "residual_ration", 0.5, "unknown key 'residual_ration'. Did you mean 'residual_ratio'?"),
    ("no_such_mode", "k", 5, "unknown merge method 'no_such_mode'"),
    ("residual", "fisher_batch_size", 0, "fisher_batch_size: Input should be greater than or equal to 1"),
])
def test_misplaced_and_unknown_options_are_errors(tiny_base, tmp_path, pair, mode, key, value, needle):
    u, s = pair
    with pytest.raises(ConfigError) as err:
        merge_utility_safety(tiny_base, [u], s, tmp_path / "m", mode=mode, **{key: value})
    assert needle in str(err.value)
    assert not (tmp_path / "m").exists()
    res = run(["-q", "merge", "--base", tiny_base, "--utility", u, "--safety", s, "--mode", mode,
               f"--{key.replace('_', '-')}", value, "--out", tmp_path / "m"])
    if res.exit_code == 2 and "No such option" in res.stderr:  # an unknown key has no flag at all
        assert key == "residual_ration"
    else:
        assert res.exit_code == 2 and needle in res.stderr


def test_grid_entries_are_strict_and_merge_defaults_apply_where_taken(tmp_path):
    from sstmerge.pipeline.experiments import expand_grid, load_experiment_config

    base = {"adapters": {"s": {"data": ["bundled:harmful_train"]}, "u": {"data": ["bundled:benign_train"]}},
            "safety": "s", "variants": {"v": ["u"]}, "merge_defaults": {"k": 4, "max_samples": 8, "density": 0.3}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**base, "grid": [{"name": "d", "mode": "direct"}, {"name": "r", "mode": "residual"},
                                                    {"name": "t", "mode": "ties"}]}))
    exps = {e.family: e for e in expand_grid(load_experiment_config(path))}
    assert "k" not in exps["d"].options and exps["r"].options["k"] == 4 and exps["t"].options["density"] == 0.3
    path.write_text(yaml.safe_dump({**base, "grid": [{"name": "t", "mode": "ties", "options": {"k": 3}}]}))
    with pytest.raises(ConfigError, match="v/t: option 'k' belongs to method"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({**base, "merge_defaults": {"kk": 1}, "grid": [{"name": "d", "mode": "direct"}]}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_experiment_config(path)


def test_resolved_options_are_frozen_and_round_trip_through_flat_keys():
    from sstmerge.merge.config import resolve_options

    opts = resolve_options({"mode": "residual", "k": 3, "residual_ratio": 0.4, "max_samples": 8, "seed": 2})
    assert opts.params.k == 3 and opts.fisher.max_samples == 8 and opts.fisher.seed == 2
    with pytest.raises(Exception):
        opts.params.k = 4  # frozen
    assert resolve_options(opts.flat()) == opts
    assert json.loads(opts.model_dump_json())["params"]["residual_ratio"] == 0.4
