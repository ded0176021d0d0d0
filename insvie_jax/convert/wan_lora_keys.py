"""Wan LoRA adapters (models/lora.py on the Wan transformer) <-> the safetensors files other tools load.

Two layouts, both with peft's `lora_A` (rank, in) / `lora_B` (out, rank) weights, one pair per projection and
layer:
- diffusers (`pipe.load_lora_weights(folder)`, `WanTransformer3DModel.load_lora_adapter`):
  `transformer.blocks.N.attn1.to_q.lora_A.weight`, `...attn2.to_out.0...`, `...ffn.net.0.proj...`, `...ffn.net.2...`
- ComfyUI / the original Wan code's names (ComfyUI's Wan LoRA loader; diffusers converts it too):
  `diffusion_model.blocks.N.self_attn.q.lora_A.weight`, `...cross_attn.o...`, `...ffn.0...`, `...ffn.2...`
Our alpha/rank scale is folded into `lora_B`, so neither file needs alpha keys or metadata: both tools apply
a LoRA without them at scale 1 (peft: lora_alpha = r). Reading accepts either layout, `lora_down` / `lora_up`
names, and `.alpha` keys (kohya style: scale alpha/rank). Pure numpy (no torch).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from insvie_jax.convert import files, mapping
from insvie_jax.convert.mapping import rule
from insvie_jax.convert.sat import NotACheckpoint

WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' `load_lora_weights(folder)` looks for
COMFYUI_WEIGHTS = "wan_lora_comfyui.safetensors"
LAYOUTS = ("diffusers", "comfyui")
_PREFIX = {"diffusers": "transformer.", "comfyui": "diffusion_model."}
# (owner, projection) in our model -> the module name in each layout
_NAMES = {
    "diffusers": {**{(a, p): f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")},
                  ("attn1", "to_out"): "attn1.to_out.0", ("attn2", "to_out"): "attn2.to_out.0",
                  ("ffn", "w1"): "ffn.net.0.proj", ("ffn", "w2"): "ffn.net.2"},
    "comfyui": {**{(a, p): f"{o}.{p[-1]}" for a, o in (("attn1", "self_attn"), ("attn2", "cross_attn"))
                   for p in ("to_q", "to_k", "to_v")},
                ("attn1", "to_out"): "self_attn.o", ("attn2", "to_out"): "cross_attn.o",
                ("ffn", "w1"): "ffn.0", ("ffn", "w2"): "ffn.2"},
}


def rules(layout: str, pairs) -> list[mapping.Rule]:
    """The key mapping of `layout` for the adapted (owner, projection) pairs: our `owner.proj.lora_A` (layers,
    rank, in) and `lora_B` (layers, out, rank), one tensor per layer in the file."""
    return [rule(f"{owner}.{proj}.lora_{ab}",
                 f"{_PREFIX[layout]}blocks.{{i}}.{_NAMES[layout][owner, proj]}.lora_{ab}.weight")
            for owner, proj in pairs for ab in "AB"]


def lora_state_dict(model, layout: str = "diffusers") -> dict[str, np.ndarray]:
    """The adapters attached to a Wan model as a peft-style state dict of `layout`, float32, scale folded in B."""
    from insvie_jax.models import lora as loralib  # jax: not needed to detect or convert a LoRA file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout '{layout}': expected one of {', '.join(LAYOUTS)}")
    adapters = loralib.wan_adapters(model)
    if not adapters:
        raise ValueError("the Wan model has no LoRA adapters to export (lora.enabled is off, or merged already)")
    flat = {}
    for owner, proj in adapters:
        adapter = getattr(getattr(model.blocks, owner), proj + "_lora")
        a = np.asarray(adapter.lora_a[...], np.float32)  # (layers, *in, rank)
        b = np.asarray(adapter.lora_b[...], np.float32)  # (layers, rank, *out)
        layers, rank = a.shape[0], a.shape[-1]
        flat[f"{owner}.{proj}.lora_A"] = a.reshape(layers, -1, rank).transpose(0, 2, 1)  # (layers, rank, in)
        flat[f"{owner}.{proj}.lora_B"] = (b.reshape(layers, rank, -1) * np.float32(adapter.scale)).transpose(0, 2, 1)
    return mapping.to_theirs(rules(layout, adapters), flat)


def save_wan_lora(model, folder: str | Path) -> list[Path]:
    """Writes `folder/pytorch_lora_weights.safetensors` (diffusers) and `folder/wan_lora_comfyui.safetensors`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for layout, name in (("diffusers", WEIGHTS), ("comfyui", COMFYUI_WEIGHTS)):
        files.write_safetensors(lora_state_dict(model, layout), out, name, max_shard_bytes=1 << 62)
        written.append(out / name)
    return written


def _parse(sd: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[int, dict[str, np.ndarray]]]:
    """{(owner, proj): {layer: {"A": (rank, in), "B": (out, rank) with any alpha/rank folded in}}}."""
    layouts = [lay for lay in LAYOUTS if any(k.startswith(_PREFIX[lay] + "blocks.") for k in sd)]
    if len(layouts) != 1:
        raise ValueError("not a Wan LoRA file: expected keys 'transformer.blocks.N.attn1.to_q.lora_A.weight' "
                         "(diffusers) or 'diffusion_model.blocks.N.self_attn.q.lora_A.weight' (ComfyUI)")
    layout = layouts[0]
    by_name = {name: pair for pair, name in _NAMES[layout].items()}
    pattern = re.compile(re.escape(_PREFIX[layout]) + r"blocks\.(\d+)\.(.+)\.(lora_A|lora_down|lora_B|lora_up)\.weight")
    found: dict = {}
    for key, value in sd.items():
        match = pattern.fullmatch(key)
        if match is None:
            if key.endswith(".alpha"):
                continue
            raise ValueError(f"Wan LoRA key '{key}' is not on a projection this model adapts "
                             f"({', '.join(sorted(by_name))})")
        layer, module, kind = int(match[1]), match[2], match[3]
        if module not in by_name:
            raise ValueError(f"Wan LoRA key '{key}': module '{module}' is not one this model adapts")
        part = "A" if kind in ("lora_A", "lora_down") else "B"
        found.setdefault(by_name[module], {}).setdefault(layer, {})[part] = np.asarray(value, np.float32)
        alpha_key = f"{_PREFIX[layout]}blocks.{layer}.{module}.alpha"
        if part == "B" and alpha_key in sd:
            found[by_name[module]][layer]["alpha"] = float(np.asarray(sd[alpha_key]))
    for layers in found.values():
        for layer in layers.values():
            if "alpha" in layer:
                layer["B"] = layer.pop("B") * np.float32(layer.pop("alpha") / layer["A"].shape[0])
    return found


def load_wan_lora(model, path: str | Path, seed: int = 0):
    """Attaches the adapters of a diffusers- or ComfyUI-layout Wan LoRA file (or a folder holding
    `pytorch_lora_weights.safetensors`) to `model` in place (alpha = rank: the file's scale is in B); returns it."""
    from safetensors.numpy import load_file

    from insvie_jax.models import lora as loralib

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"Wan LoRA file not found: {path}: pass a .safetensors file or a folder holding "
                                f"{WEIGHTS}")
    found = _parse(load_file(path))
    cfg = model.cfg
    ranks = {layer["A"].shape[0] for layers in found.values() for layer in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"{path}: adapters of several ranks {sorted(ranks)}; one rank per file is supported")
    rank = ranks.pop()
    for pair, layers in found.items():
        if sorted(layers) != list(range(cfg.num_layers)) or any(set(v) != {"A", "B"} for v in layers.values()):
            raise ValueError(f"{path}: '{pair[0]}.{pair[1]}' needs lora_A and lora_B for all {cfg.num_layers} layers")
    loralib.add_wan_lora(model, rank, float(rank), [f"{owner}.{proj}" for owner, proj in found], seed)
    for owner, proj in loralib.wan_adapters(model):
        adapter = getattr(getattr(model.blocks, owner), proj + "_lora")
        layers = found[owner, proj]
        a = np.stack([layers[i]["A"].T for i in range(cfg.num_layers)])  # (layers, in, rank)
        b = np.stack([layers[i]["B"].T for i in range(cfg.num_layers)])  # (layers, rank, out)
        adapter.lora_a[...] = a.reshape(adapter.lora_a[...].shape).astype(adapter.lora_a[...].dtype)
        adapter.lora_b[...] = b.reshape(adapter.lora_b[...].shape).astype(adapter.lora_b[...].dtype)
    return model


# ---------------------------------------------------------------------------------------------------
# Codecs (convert/registry.py): a LoRA file converts between the two layouts (alpha folded into B)


def _file(path: Path, layout: str) -> Path:
    return path if path.is_file() else path / {"diffusers": WEIGHTS, "comfyui": COMFYUI_WEIGHTS}[layout]


def layout_of(path: Path) -> str | None:
    """The layout of a LoRA file (or of the file a folder holds), from its tensor names; None if neither."""
    from safetensors import SafetensorError, safe_open

    for layout in LAYOUTS:
        file = _file(path, layout)
        if file.is_file() and file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="numpy") as f:
                    if any(k.startswith(_PREFIX[layout] + "blocks.") and ".lora_" in k for k in f.keys()):
                        return layout
            except (SafetensorError, OSError):
                return None
    return None


def _read(path: Path, options, layout: str):
    try:
        found = _parse(files.read_safetensors(_file(path, layout), options.progress))
    except ValueError as err:  # names the key that fits no adapted projection
        raise NotACheckpoint(f"{_file(path, layout)}: {err}") from None
    flat = {}
    for (owner, proj), layers in found.items():
        for ab in "AB":
            flat[f"{owner}.{proj}.lora_{ab}"] = np.stack([layers[i][ab] for i in sorted(layers)])
    check(flat, None, f"Wan LoRA file {_file(path, layout)}")
    return flat, None


def _write(flat, folder: Path, options, layout: str) -> None:
    pairs = sorted({tuple(k.split(".")[:2]) for k in flat})
    sd = files.cast(mapping.to_theirs(rules(layout, pairs), flat), options.dtype, options.progress)
    if folder.suffix == ".safetensors":  # a file destination
        files.write_safetensors(sd, folder.parent, folder.name, max_shard_bytes=1 << 62)
    else:
        folder.mkdir(parents=True)
        files.write_safetensors(sd, folder, _file(folder, layout).name, max_shard_bytes=1 << 62)


def check(flat: dict[str, np.ndarray], cfg, what: str) -> None:
    """Every adapted projection has A (layers, rank, in) and B (layers, out, rank) of one rank."""
    for key, a in flat.items():
        if key.endswith(".lora_A"):
            b = flat.get(key[:-1] + "B")
            if b is None or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
                raise NotACheckpoint(f"{what}: '{key[:-7]}' needs lora_A and lora_B of one rank for every layer")


def read_diffusers(path: Path, options):
    return _read(path, options, "diffusers")


def read_comfyui(path: Path, options):
    return _read(path, options, "comfyui")


def write_diffusers(flat, cfg, folder: Path, options) -> None:
    _write(flat, folder, options, "diffusers")


def write_comfyui(flat, cfg, folder: Path, options) -> None:
    _write(flat, folder, options, "comfyui")
