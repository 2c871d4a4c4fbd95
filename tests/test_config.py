"""Parameters: deep merge, preset overlay, overrides, schema defaults and errors, --params."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from specmatch import cli, config, grid
from specmatch.errors import SpecmatchError

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"
PRESETS = REPO / "presets"


def _minimal() -> dict:
    return {
        "datasets": {"emb": {"source": "embedded", "n_train": 8, "n_test": 2}},
        "grid": {"datasets": ["emb"]},
    }


def _presets(tmp_path: Path, **overlays) -> Path:
    d = tmp_path / "presets"
    d.mkdir()
    (d / "paper.yaml").write_text("{}\n")  # the paper grid: the empty overlay
    for name, overlay in overlays.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(overlay))
    return d


# --------------------------------------------------------------------------- deep_merge


def test_deep_merge_mappings_merge_lists_and_scalars_replace():
    base = {"a": {"x": 1, "y": [1, 2, 3], "n": {"p": 1, "q": 2}}, "b": [1, 2], "c": "keep", "s": {"k": 1}}
    overlay = {"a": {"y": [9], "n": {"q": 3}, "new": True}, "b": [], "d": {"z": 0}, "s": 5}
    before = copy.deepcopy(base), copy.deepcopy(overlay)
    out = config.deep_merge(base, overlay)
    assert out == {
        "a": {"x": 1, "y": [9], "n": {"p": 1, "q": 3}, "new": True},
        "b": [],
        "c": "keep",
        "d": {"z": 0},
        "s": 5,
    }
    # inputs untouched, output shares no mutable state with them
    assert (base, overlay) == before
    out["a"]["n"]["p"] = 100
    out["d"]["z"] = 100
    assert base["a"]["n"]["p"] == 1 and overlay["d"]["z"] == 0


def test_deep_merge_scalar_replaced_by_mapping():
    assert config.deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert config.deep_merge({"a": {"b": 2}}, {}) == {"a": {"b": 2}}


# --------------------------------------------------------------------------- resolve


def test_resolve_fills_defaults(tmp_path):
    params = _minimal()
    frozen = copy.deepcopy(params)
    out = config.resolve(params, _presets(tmp_path))
    assert params == frozen  # not modified in place
    assert out["preset"] == "paper"
    assert out["results"] == "results"
    assert out["spectra"]["n_bins"] == 16
    assert out["spectra"]["deltas"] == [0.6, 0.8, 1.0, 1.2]
    assert out["spectra"]["split"] == "train"
    emb = out["datasets"]["emb"]
    assert emb["on_bad_image"] == "error"
    assert emb["resolution"] == 256
    assert emb["crop_scale"] == [0.125, 1.0]
    assert emb["test_region"] == 0.25
    assert emb["compression"] == "none"
    assert emb["test_root"] is None


def test_resolve_applies_preset_and_overrides_win(tmp_path):
    presets = _presets(tmp_path, small={"spectra": {"max_images": 5, "batch_size": 3},
                                        "datasets": {"emb": {"n_train": 4}}})
    params = _minimal()
    out = config.resolve(params, presets, {"preset": "small", "spectra": {"batch_size": 7}})
    assert out["preset"] == "small"
    assert out["spectra"]["max_images"] == 5  # from the preset
    assert out["spectra"]["batch_size"] == 7  # the override beats the preset
    assert out["datasets"]["emb"]["n_train"] == 4
    assert out["datasets"]["emb"]["n_test"] == 2  # merged, not replaced


def test_resolve_preset_key_in_params(tmp_path):
    presets = _presets(tmp_path, small={"spectra": {"n_bins": 8}})
    params = {**_minimal(), "preset": "small"}
    assert config.resolve(params, presets)["spectra"]["n_bins"] == 8


def test_resolve_real_params_tiny():
    params = config.load_yaml(PARAMS_YAML)
    out = config.resolve(params, PRESETS, {"preset": "tiny"})
    assert out["preset"] == "tiny"
    assert out["grid"]["datasets"] == ["embedded", "embedded_32px"]
    assert out["spectra"]["max_images"] == 2048
    assert out["spectra"]["batch_size"] == 512
    assert out["spectra"]["n_bins"] == 16
    emb = out["datasets"]["embedded"]
    assert emb["source"] == "embedded" and emb["resolution"] == 64
    assert emb["on_bad_image"] == "error"
    # command-line overrides beat the preset
    out2 = config.resolve(params, PRESETS, {"preset": "tiny", "spectra": {"max_images": 9}})
    assert out2["spectra"]["max_images"] == 9 and out2["spectra"]["batch_size"] == 512


def test_load_real_params_both_presets():
    paper = config.load(PARAMS_YAML)
    assert paper["preset"] == "paper"
    assert paper["grid"]["datasets"] == ["celebahq", "imagenet"]
    assert paper["datasets"]["imagenet"]["test_root"] == "data/raw/imagenet/val"
    tiny = config.load(PARAMS_YAML, "tiny")
    assert tiny["grid"]["datasets"] == ["embedded", "embedded_32px"]
    assert tiny["datasets"] == paper["datasets"]
    explicit_paper = config.load(PARAMS_YAML, "paper")
    assert explicit_paper == paper


def test_unknown_preset_lists_known(tmp_path):
    presets = _presets(tmp_path, alpha={}, beta={})
    with pytest.raises(SpecmatchError) as e:
        config.resolve(_minimal(), presets, {"preset": "gamma"})
    msg = str(e.value)
    assert "gamma" in msg and "alpha" in msg and "beta" in msg


def test_preset_must_be_a_mapping(tmp_path):
    presets = _presets(tmp_path)
    (presets / "listy.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecmatchError, match="listy"):
        config.resolve(_minimal(), presets, {"preset": "listy"})


def test_unknown_preset_real_repo():
    with pytest.raises(SpecmatchError) as e:
        config.load(PARAMS_YAML, "nosuchpreset")
    assert "nosuchpreset" in str(e.value) and "tiny" in str(e.value) and "paper" in str(e.value)


def test_grid_with_unknown_dataset(tmp_path):
    params = _minimal()
    params["grid"]["datasets"] = ["emb", "ghost"]
    with pytest.raises(SpecmatchError, match="ghost"):
        config.resolve(params, _presets(tmp_path))


@pytest.mark.parametrize(
    "mutate, key, fragment",
    [
        (lambda p: p.__setitem__("bogus_top", 1), "bogus_top", None),
        (lambda p: p["datasets"]["emb"].__setitem__("colour", "red"), "colour", "datasets.emb"),
        (lambda p: p["datasets"]["emb"].__setitem__("resolution", "64"), "resolution", "datasets.emb.resolution"),
        (lambda p: p["datasets"]["emb"].__setitem__("on_bad_image", "ignore"), "ignore", "datasets.emb.on_bad_image"),
        (lambda p: p["datasets"]["emb"].__setitem__("source", "s3"), "s3", "datasets.emb.source"),
        (lambda p: p.__setitem__("spectra", {"n_bins": 1}), "n_bins", "spectra.n_bins"),
        (lambda p: p["grid"].__setitem__("datasets", []), "datasets", "grid.datasets"),
        (lambda p: p["datasets"].__setitem__("folder1", {"source": "folder"}), "root", "datasets.folder1"),
    ],
)
def test_invalid_parameters_name_the_key(tmp_path, mutate, key, fragment):
    params = _minimal()
    mutate(params)
    with pytest.raises(SpecmatchError) as e:
        config.resolve(params, _presets(tmp_path))
    msg = str(e.value)
    assert key in msg
    if fragment:
        assert fragment in msg


def test_resolve_rejects_non_mapping(tmp_path):
    with pytest.raises(SpecmatchError, match="mapping"):
        config.resolve(["not", "a", "mapping"], _presets(tmp_path))


def test_load_yaml_errors(tmp_path):
    with pytest.raises(SpecmatchError, match="not found"):
        config.load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: {")
    with pytest.raises(SpecmatchError, match="bad.yaml"):
        config.load_yaml(bad)


# --------------------------------------------------------------------------- validate (one section)


def test_validate_dataset_section_defaults_and_errors():
    p = config.validate({"source": "folder", "root": "x"}, ref="dataset", where="datasets.d")
    assert p["on_bad_image"] == "error" and p["workers"] == 8 and "n_train" not in p  # optional: absent = all images
    with pytest.raises(SpecmatchError) as e:
        config.validate({"source": "folder"}, ref="dataset", where="datasets.d")
    assert "root" in str(e.value) and "datasets.d" in str(e.value)
    with pytest.raises(SpecmatchError) as e:
        config.validate({"source": "folder", "root": "x", "workers": 0}, ref="dataset", where="datasets.d")
    assert "datasets.d.workers" in str(e.value)


def test_validate_spectra_section_defaults():
    p = config.validate({}, ref="spectra", where="spectra")
    assert p == {"split": "train", "max_images": 10000, "batch_size": 256, "n_bins": 16,
                 "deltas": [0.6, 0.8, 1.0, 1.2], "blur": "auto", "blur_kernel": 7,
                 "blur_sigma": 1.2, "seed": 0}


# --------------------------------------------------------------------------- --params


def test_parse_params_arg_json_and_yaml(tmp_path):
    assert config.parse_params_arg('{"a": 1, "b": {"c": [1, 2]}}') == {"a": 1, "b": {"c": [1, 2]}}
    assert config.parse_params_arg('  {"a": 1}  ') == {"a": 1}
    f = tmp_path / "p.yaml"
    f.write_text("source: embedded\nn_train: 4\nlist: [1, 2]\n")
    assert config.parse_params_arg(str(f)) == {"source": "embedded", "n_train": 4, "list": [1, 2]}
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"x": 1.5}))
    assert config.parse_params_arg(str(j)) == {"x": 1.5}


def test_parse_params_arg_rejects(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(SpecmatchError, match="mapping"):
        config.parse_params_arg(str(f))
    s = tmp_path / "scalar.yaml"
    s.write_text("just a string\n")
    with pytest.raises(SpecmatchError, match="mapping"):
        config.parse_params_arg(str(s))
    with pytest.raises(SpecmatchError, match="JSON"):
        config.parse_params_arg('{"a": 1,')
    with pytest.raises(SpecmatchError, match="not found"):
        config.parse_params_arg(str(tmp_path / "missing.yaml"))


# --------------------------------------------------------------------------- CLI


def test_cli_params_show(capsys):
    rc = cli.main(["params", "show", "--params-file", str(PARAMS_YAML), "--preset", "tiny",
                   "--key", "grid.datasets", "--compact"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == ["embedded", "embedded_32px"]
    rc = cli.main(["params", "show", "--params-file", str(PARAMS_YAML), "--key", "spectra"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["n_bins"] == 16


def test_cli_params_show_errors(capsys):
    rc = cli.main(["params", "show", "--params-file", str(PARAMS_YAML), "--key", "spectra.nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "spectra.nope" in err and "Traceback" not in err
    rc = cli.main(["params", "show", "--params-file", str(PARAMS_YAML), "--preset", "huge"])
    err = capsys.readouterr().err
    assert rc == 2 and "huge" in err and "tiny" in err and "Traceback" not in err


def test_typed_command_line_reads_nested_scalars_as_yaml():
    # What Snakemake hands over for `--config preset=tiny 'metrics={pr_k: 5, device: cpu}' ...`
    # (its BaseLoader keeps nested scalars strings).
    raw = {"preset": "tiny", "metrics": {"pr_k": "5", "device": "cpu", "lr": "1e-4", "flip": "true"},
           "grid": {"datasets": ["embedded"]}, "n": 3, "empty": ""}
    out = config.typed_command_line(raw)
    assert out == {"preset": "tiny", "metrics": {"pr_k": 5, "device": "cpu", "lr": 1e-4, "flip": True},
                   "grid": {"datasets": ["embedded"]}, "n": 3, "empty": ""}
    assert config.typed_command_line({"x": "{unbalanced"}) == {"x": "{unbalanced"}


def test_named_sampler_takes_unset_keys_from_diffusion_sample():
    """A named sampler overrides only what it sets: the tiny preset's diffusion.sample
    (n_samples 128, device cpu) must reach it, not the schema defaults (50000, auto)."""
    resolved = config.load(PARAMS_YAML, "tiny")
    s = grid.sampler(resolved, "tiny-sde30-cfg")
    assert s["n_samples"] == 128 and s["device"] == "cpu" and s["batch_size"] == 64
    assert s["steps"] == 30 and s["cfg_scale"] == 2.0 and s["cfg_interval"] == [0.0, 0.7]
    paper = grid.sampler(config.load(PARAMS_YAML), "sde250-50k")
    assert paper["n_samples"] == 50000 and paper["method"] == "euler-maruyama" and paper["cfg_scale"] == 1.0


def test_diffusion_run_merges_shared_train_and_checks_samplers():
    resolved = config.load(PARAMS_YAML, "tiny")
    run = grid.diffusion_run(resolved, "embedded-tiny-dsm-sit")
    assert run["train"]["steps"] == 160 and run["train"]["device"] == "cpu"  # from diffusion.train
    assert run["conditional"] is True and run["process"]["kind"] == "linear"
    paper = grid.diffusion_run(config.load(PARAMS_YAML), "celebahq-f8d4-sdvae-uvit")
    assert paper["train"]["steps"] == 500000 and paper["train"]["betas"] == [0.99, 0.99]
    assert paper["train"]["batch_size"] == 256 and paper["model"] == "UViT-S/2"
    bad = copy.deepcopy(resolved)
    bad["diffusions"]["embedded-tiny-dsm-sit"]["samplers"] = ["nope"]
    with pytest.raises(SpecmatchError, match="undefined samplers"):
        grid.diffusion_run(bad, "embedded-tiny-dsm-sit")
    with pytest.raises(SpecmatchError, match="no diffusion run"):
        grid.diffusion_run(resolved, "missing")


def test_named_sampler_with_unknown_key_is_refused(tmp_path):
    params = config.load_yaml(PARAMS_YAML)
    params["samplers"]["dpm50-10k"]["stepz"] = 3
    resolved = config.resolve(params, REPO / "presets")  # the schema leaves a sampler's keys open
    with pytest.raises(SpecmatchError, match="samplers.dpm50-10k"):
        grid.Grid.build(resolved)


def test_params_show_run_prints_what_the_stage_receives(capsys):
    assert cli.main(["params", "show", "--preset", "tiny", "--run", "diffusion:embedded-tiny-sdvae-uvit",
                     "--compact"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == grid.diffusion_run(config.load(PARAMS_YAML, "tiny"), "embedded-tiny-sdvae-uvit")
    assert cli.main(["params", "show", "--run", "bogus"]) == 2


def test_diffusion_run_alignment_merges_shared_and_keeps_what_acts():
    resolved = config.load(PARAMS_YAML, "tiny")
    assert grid.diffusion_run(resolved, "embedded-tiny-dsm-sit")["alignment"] == {"kind": "none"}
    dog = grid.diffusion_run(resolved, "embedded-tiny-dsm-sit-dog")["alignment"]
    # the tiny preset's shared settings over the paper's defaults, then the run's kind
    assert (dog["kind"], dog["encoder"], dog["depth"], dog["proj_hidden"], dog["weight"]) == (
        "dog", "efficientnet-lite0-s8", 2, 256, 0.5)
    assert dog["projector"] == "mlp" and dog["dog"] == {"sigma1": 0.8, "sigma2": 2.0} and "irepa_gamma" not in dog
    irepa = grid.diffusion_run(resolved, "embedded-tiny-dsm-sit-irepa")["alignment"]
    assert irepa["projector"] == "conv" and irepa["irepa_gamma"] == 1.0
    assert "dog" not in irepa and "proj_hidden" not in irepa  # a conv projector has no hidden width
    repa = grid.diffusion_run(config.load(PARAMS_YAML), "imagenet-f16d16-dsm-sit-repa")["alignment"]
    assert (repa["encoder"], repa["depth"], repa["proj_hidden"], repa["projector"]) == ("dinov2-vitb14", 8, 2048, "mlp")
    bad = copy.deepcopy(resolved)
    bad["diffusions"]["embedded-tiny-dsm-sit-dog"]["alignment"]["kind"] = "vrepa"
    with pytest.raises(SpecmatchError, match="alignment"):
        grid.diffusion_run(bad, "embedded-tiny-dsm-sit-dog")
