"""`specmatch import-ae`: a released KL autoencoder (the public SD-VAE) as an autoencoder of the grid.

A diffusers-format AutoencoderKL folder -- `config.json` and `diffusion_pytorch_model.safetensors`,
e.g. stabilityai/sd-vae-ft-ema or sd-vae-ft-mse -- provided by the user as files (nothing is
downloaded; the weights file is a resource of the manifest, checked against its sha256 when one
is listed) is mapped onto our `AutoencoderKL` with SD's down-sampling padding
(`downsample_padding: sd`) and written as a `train-ae` output (`artifact.write`), so `eval-ae`,
`extract-latents` and sampling read it like a trained one.

The layout was learnt from reading diffusers' AutoencoderKL and is mapped here key by key
(never by loading diffusers at run time; diffusers is a test dependency only):

    encoder.down_blocks.{i}.resnets.{j}.*           -> encoder.down.{i}.block.{j}.*
    encoder.down_blocks.{i}.downsamplers.0.conv.*   -> encoder.down.{i}.downsample.conv.*
    decoder.up_blocks.{i}.*                         -> decoder.up.{n-1-i}.*   (diffusers runs
                                                       up blocks from the lowest resolution; our
                                                       `up` is indexed by level, as SD's)
    decoder.up_blocks.{i}.upsamplers.0.conv.*       -> decoder.up.{n-1-i}.upsample.conv.*
    {encoder,decoder}.mid_block.resnets.{0,1}.*     -> *.mid.block_{1,2}.*
    *.mid_block.attentions.0.group_norm             -> *.mid.attn_1.norm
    *.mid_block.attentions.0.to_{q,k,v}, to_out.0   -> *.mid.attn_1.{q,k,v,proj_out}  (Linear
                                                       [C, C] -> 1x1 conv [C, C, 1, 1]); the
                                                       older names query, key, value, proj_attn
                                                       (files written by diffusers < 0.14, as
                                                       the sd-vae-ft-* ones) are read too
    *.conv_norm_out                                 -> *.norm_out
    resnets' conv_shortcut                          -> nin_shortcut
    conv_in, conv_out, quant_conv, post_quant_conv  -> the same names

A file with a missing, unexpected or misshaped tensor is refused with every such key named;
nothing is guessed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .. import config as config_mod
from .. import resources
from ..errors import SpecmatchError
from ..runtime import atomic
from ..runtime.hashing import sha256_file
from ..runtime.provenance import Provenance
from ..runtime.weights import load_safetensors, mismatch_problems
from . import artifact
from . import model as ae_model

log = logging.getLogger(__name__)

STAGE = "import-ae"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
VARIANT = "pretrained"

# diffusers config keys and the only values our architecture reproduces (absent = the default).
_REQUIRED_VALUES = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "shift_factor": None, "latents_mean": None, "latents_std": None}
_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def read_config(path: str | Path) -> tuple[ae_model.AEConfig, float, dict[str, Any]]:
    """(our AEConfig with SD padding, the latent scaling factor, the raw config) of a diffusers
    AutoencoderKL `config.json`; an error names the file and the key it cannot take."""
    path = Path(path)
    if not path.is_file():
        raise SpecmatchError(f"{path}: missing (a diffusers AutoencoderKL folder holds {CONFIG_FILE} beside "
                             f"{WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecmatchError(f"{path}: not valid JSON ({e})") from None

    def need(key: str):
        if key not in raw:
            raise SpecmatchError(f"{path}: no key {key!r} (expected a diffusers AutoencoderKL config)")
        return raw[key]

    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise SpecmatchError(f"{path}: _class_name is {raw['_class_name']!r}, expected 'AutoencoderKL'")
    channels = tuple(int(c) for c in need("block_out_channels"))
    n = len(channels)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(raw.get(key, [block] * n))
        if types != [block] * n:
            raise SpecmatchError(f"{path}: {key} {types}; only {n} x {block!r} maps onto this autoencoder")
    for key, want in _REQUIRED_VALUES.items():
        if raw.get(key, want) != want:
            raise SpecmatchError(f"{path}: {key} = {raw[key]!r}; only {want!r} maps onto this autoencoder")
    if int(raw.get("in_channels", 3)) != int(raw.get("out_channels", 3)):
        raise SpecmatchError(f"{path}: in_channels {raw.get('in_channels')} != out_channels {raw.get('out_channels')}")
    cfg = ae_model.config({
        "name": str(raw.get("_name_or_path") or path.parent.name or "pretrained"), "channels": channels,
        "z_channels": int(need("latent_channels")), "num_res_blocks": int(need("layers_per_block")),
        "in_channels": int(raw.get("in_channels", 3)), "norm_groups": int(raw.get("norm_num_groups", 32)),
        "attn_in_mid": bool(raw.get("mid_block_add_attention", True)), "downsample_padding": "sd"})
    scaling = float(raw.get("scaling_factor", 0.18215))
    return cfg, scaling, raw


def _rename(key: str, n_levels: int) -> str | None:
    """Our name for a diffusers AutoencoderKL key, or None for a key outside the layout."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        return key if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key) else None
    side, rest = m.groups()
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        return f"{side}.{rest}"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)"
                     r"\.(weight|bias)", rest)
    if m:
        part = "norm" if m.group(1) == "group_norm" else _ATTN[m.group(1)]
        return f"{side}.mid.attn_1.{part}.{m.group(2)}"
    blocks, sampler = ("down_blocks", "downsamplers") if side == "encoder" else ("up_blocks", "upsamplers")
    m = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", rest)
    if m is None:
        return None
    i, tail = int(m.group(1)), m.group(2)
    level = i if side == "encoder" else n_levels - 1 - i
    ours = "down" if side == "encoder" else "up"
    m = re.fullmatch(r"resnets\.(\d+)\.(.+)", tail)
    if m:
        return f"{side}.{ours}.{level}.block.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(rf"{sampler}\.0\.conv\.(weight|bias)", tail)
    if m:
        return f"{side}.{ours}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{m.group(1)}"
    return None


def convert_state_dict(tensors: dict[str, torch.Tensor], cfg: ae_model.AEConfig,
                       where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict (float32) from a diffusers AutoencoderKL state dict for `cfg`. Every key of
    the file must map onto a parameter of the same shape (attention Linears become 1x1 convs),
    and every parameter must be given: otherwise an error naming every offending key."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in ae_model.build(cfg).state_dict().items()}
    n_levels = len(cfg.channels)
    out: dict[str, torch.Tensor] = {}
    unexpected, misshaped, twice = [], [], []
    for key, value in tensors.items():
        ours = _rename(key, n_levels)
        if ours is None or ours not in want:
            unexpected.append(key)
            continue
        if ours in out:
            twice.append(f"{key} (-> {ours})")
            continue
        if ".mid.attn_1." in ours and ours.endswith(".weight") and ".norm." not in ours and value.ndim == 2:
            value = value[:, :, None, None]  # a Linear over channels is a 1x1 conv
        if tuple(value.shape) != want[ours]:
            misshaped.append(f"{key} {tuple(value.shape)} (expected {want[ours]} for {ours})")
            continue
        out[ours] = value.detach().to(torch.float32).contiguous()
    problems = mismatch_problems(set(want) - set(out), unexpected, misshaped)
    if twice:
        problems.append(f"given twice (old and new attention names): {twice}")
    if problems:
        raise SpecmatchError(f"{where}: does not fit a diffusers AutoencoderKL of config {cfg.channels}, "
                             f"z {cfg.z_channels}, {cfg.num_res_blocks} blocks per level: " + "; ".join(problems))
    return out


def load_folder(folder: str | Path, device="cpu") -> tuple[ae_model.AutoencoderKL, float, dict[str, Any]]:
    """(our autoencoder in eval mode, its scaling factor, the raw config) of a diffusers folder."""
    folder = Path(folder)
    cfg, scaling, raw = read_config(folder / CONFIG_FILE)
    state = convert_state_dict(load_safetensors(folder / WEIGHTS_FILE), cfg, str(folder / WEIGHTS_FILE))
    ae = ae_model.build(cfg)
    ae.load_state_dict(state)
    ae.to(device).eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, scaling, raw


def import_autoencoder(run: dict[str, Any], name: str, out: str | Path) -> dict[str, Any]:
    """Write the `train-ae`-format output of the pretrained autoencoder `run["pretrained"]` (a
    resource of the manifest: the weights file, with `config.json` beside it)."""
    run = config_mod.validate(run, "ae_run", where="autoencoder run", source=f"parameters of {name}")
    resource = run.get("pretrained")
    if not resource:
        raise SpecmatchError(f"autoencoder run {name}: import-ae needs `pretrained` (a resource name, e.g. "
                             "sd-vae-ft-ema); a run without it is trained with `specmatch train-ae`")
    weights_path, weights_sha = resources.require(resource, run["resources_dir"])
    config_path = weights_path.parent / CONFIG_FILE
    cfg, scaling, raw = read_config(config_path)
    state = convert_state_dict(load_safetensors(weights_path), cfg, str(weights_path))
    ae = ae_model.build(cfg)
    ae.load_state_dict(state)
    summary = {"name": name, "kind": artifact.KIND, "fingerprint": weights_sha,
               "config": cfg.__dict__ | {"channels": list(cfg.channels)}, "variant": VARIANT,
               "objective": {},  # trained by its authors, with no objective of ours
               "pretrained": {"resource": resource, "weights_sha256": weights_sha,
                              "config_sha256": sha256_file(config_path), "scaling_factor": scaling,
                              "diffusers_config": {k: v for k, v in raw.items() if not k.startswith("_")}},
               "generator_steps": 0, "discriminator_steps": 0, "ema": False, "dataset_images_sha256": None,
               "parameters": ae_model.count_parameters(ae)}
    prov = Provenance(STAGE, name, run)
    prov.add_input(weights_path, f"weights:{resource}", weights_sha)
    prov.add_input(config_path, f"config:{resource}")
    with atomic.atomic_dir(Path(out)) as tmp:
        artifact.write(tmp, {f"ae.{k}": v for k, v in state.items()}, summary, weights_sha)
        prov.write(out, tmp)
    log.info("import-ae %s: %s (%s, %d parameters, scaling factor %g) in %s", name, resource, weights_path,
             summary["parameters"], scaling, out)
    return summary
