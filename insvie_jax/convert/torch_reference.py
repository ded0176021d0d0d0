"""The PyTorch references of `insvie-jax bench`'s workloads (diffusers / transformers / torch), and the files
through which each gets the same weights and inputs as ours.

Our workload runs first (its own process) and writes into a scratch folder: `weights.safetensors` (our flat
parameter names, in the reference's compute dtype; bf16 stored as its uint16 bits), `inputs.npz` and, when the
outputs are comparable, `output.npy`. The reference (a later process) converts the weights with the project's
numpy key maps, runs the same workload, and reports its median time, peak memory and the relative difference
‖ours − ref‖ / ‖ref‖ of the compared output. torch, diffusers and transformers are imported inside functions.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import ml_dtypes
import numpy as np

WEIGHTS, INPUTS, OUTPUT = "weights.safetensors", "inputs.npz", "output.npy"
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# Exchange files (numpy only: our side writes them without torch)


def write_exchange(folder: str | Path, weights: dict[str, np.ndarray] | None, inputs: dict[str, np.ndarray],
                   dtype: str) -> None:
    """Weights cast to `dtype` (the reference's compute dtype) and inputs (float32 / ints) into `folder`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        cast = {k: _to_dtype(v, dtype) for k, v in weights.items()}
        stored = {k: v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v for k, v in cast.items()}
        save_file(stored, str(folder / WEIGHTS), metadata={"dtype": dtype})
    np.savez(folder / INPUTS, **{k: _storable(v) for k, v in inputs.items()})


def write_output(folder: str | Path, output: np.ndarray) -> None:
    np.save(Path(folder) / OUTPUT, np.asarray(output, np.float32))


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return np.ascontiguousarray(np.asarray(x).astype(target))


def _storable(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == ml_dtypes.bfloat16 else x


def read_weights(folder: str | Path) -> dict[str, np.ndarray] | None:
    """Our flat weights as written (bf16 as ml_dtypes.bfloat16), or None when ours wrote none."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS
    if not path.exists():
        return None
    with safe_open(str(path), framework="np") as f:
        bf16 = (f.metadata() or {}).get("dtype") == "bfloat16"
        return {k: f.get_tensor(k).view(ml_dtypes.bfloat16) if bf16 else f.get_tensor(k) for k in f.keys()}


def read_inputs(folder: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / INPUTS) as data:
        return {k: data[k] for k in data.files}


def relative_difference(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


# ---------------------------------------------------------------------------------------------------
# torch side helpers


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def _tensor(x: np.ndarray, dtype=None):
    """numpy (ml_dtypes bf16 included) -> torch tensor on the device, optionally cast."""
    import torch

    x = np.asarray(x)
    t = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16) \
        if x.dtype == ml_dtypes.bfloat16 else torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(_device())
    return t.to(dtype) if dtype is not None else t


def _load_state(module, state: dict[str, np.ndarray], dtype, allow_missing: tuple = ()) -> None:
    import torch

    tensors = {k: _tensor(v, dtype) for k, v in state.items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        raise RuntimeError(f"reference weights do not fit {type(module).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    del tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(step, repeats: int) -> tuple[dict, object]:
    """As insvie_jax.bench.timing.measure, for torch: one warm-up call (cuDNN / kernel selection), then the peak
    counter reset (what stays allocated still counts) and `repeats` synchronised calls."""
    import torch

    start = time.perf_counter()
    out = step()
    _sync()
    first = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = step()
        _sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    result = {"median_s": statistics.median(times), "first_s": first, "times": times, "peak_gib": peak,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    return result, out


def _compare(result: dict, folder: Path, ref_output) -> dict:
    """Adds `rel_diff` (ours vs this reference output) when ours wrote its output."""
    path = Path(folder) / OUTPUT
    if path.exists() and ref_output is not None:
        result["rel_diff"] = relative_difference(np.load(path), ref_output)
    return result


def _channels_last(t) -> np.ndarray:
    """torch (B, C, F, H, W) or diffusers' (B, F, C, H, W) handled by the caller; this just goes to numpy fp32."""
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Transformer: diffusers CogVideoXTransformer3DModel with in_channels = 2 x latent channels


def _diffusers_transformer(cfg, folder: Path, dtype, train: bool, remat: bool):
    """diffusers' model of `model.family` (CogVideoXTransformer3DModel / WanTransformer3DModel) holding our
    side's weights."""
    import torch
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    if cfg.model.family == "wan":
        from insvie_jax.convert.wan_keys import diffusers_config, transformer_to_diffusers
        cls = WanTransformer3DModel
    else:
        from insvie_jax.convert.diffusers_keys import diffusers_config, transformer_to_diffusers
        cls = CogVideoXTransformer3DModel

    kwargs = {k: v for k, v in diffusers_config(cfg.model).items() if not k.startswith("_")}
    with torch.device(_device()):  # built on the device: its random init is replaced below
        model = cls(**kwargs).to(dtype)
    flat = read_weights(folder)
    if flat is None:
        raise RuntimeError(f"{folder}: our side wrote no weights (run ours first)")
    sd = transformer_to_diffusers(flat, cfg.model)
    del flat
    _load_state(model, sd, dtype)
    model.train(train)
    if remat:
        model.enable_gradient_checkpointing()
    return model


def _theirs_layout(cfg, x: np.ndarray) -> np.ndarray:
    """Our (B, F, H, W, C) latents in diffusers' layout: CogVideoX (B, F, C, H, W), Wan (B, C, F, H, W)."""
    return x.transpose(0, 4, 1, 2, 3) if cfg.model.family == "wan" else x.transpose(0, 1, 4, 2, 3)


def _ours_layout(cfg, out) -> np.ndarray:
    out = _channels_last(out)
    return out.transpose(0, 2, 3, 4, 1) if cfg.model.family == "wan" else out.transpose(0, 1, 3, 4, 2)


def _transformer_inputs(cfg, folder: Path, dtype):
    x = read_inputs(folder)
    # diffusers: hidden_states = [noisy | source] on channels
    hidden = _theirs_layout(cfg, np.concatenate([x["noisy"], x["source"]], axis=-1))
    rope = (_tensor(x["rope_cos"]), _tensor(x["rope_sin"])) if "rope_cos" in x else None
    return _tensor(hidden, dtype), _tensor(x["text"], dtype), _tensor(x["timestep"]), rope, x


def _call(cfg, model, hidden, text, t, rope):
    if cfg.model.family == "wan":
        return model(hidden_states=hidden, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    return model(hidden_states=hidden, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                 return_dict=False)[0]


def transformer_forward(cfg, options: dict, folder: Path, repeats: int) -> dict:
    import torch

    dtype = _torch_dtype(cfg.model.dtype)
    model = _diffusers_transformer(cfg, folder, dtype, train=False, remat=False)
    hidden, text, t, rope, _ = _transformer_inputs(cfg, folder, dtype)

    @torch.no_grad()
    def step():
        return _call(cfg, model, hidden, text, t, rope)

    result, out = _measure(step, repeats)
    return _compare(result, folder, _ours_layout(cfg, out))


def transformer_forward_backward(cfg, options: dict, folder: Path, repeats: int) -> dict:
    """Gradients of all weights (bf16 weights, eager, SDPA attention: the issue's measurement); gradient
    checkpointing when ours rematerialises."""
    import torch

    if cfg.lora.enabled:
        return {"skipped": "no LoRA reference (diffusers' LoRA needs peft)"}
    dtype = _torch_dtype(cfg.model.dtype)
    model = _diffusers_transformer(cfg, folder, dtype, train=True, remat=cfg.model.remat_policy != "none")
    hidden, text, t, rope, x = _transformer_inputs(cfg, folder, dtype)
    target = _tensor(_theirs_layout(cfg, x["target"]), torch.float32)

    def step():
        model.zero_grad(set_to_none=True)
        out = _call(cfg, model, hidden, text, t, rope)
        torch.mean(torch.square(out.float() - target)).backward()
        return out.detach()

    result, out = _measure(step, repeats)
    return _compare(result, folder, _ours_layout(cfg, out))


def train_step(cfg, options: dict, folder: Path, repeats: int) -> dict:
    """Full fine-tune step: fp32 master weights, bf16 autocast, MSE on v, global-norm clipping, fused AdamW
    (ours: the InsViE objective + optax AdamW, same precision recipe). No LoRA reference (needs peft)."""
    import torch

    if cfg.lora.enabled:
        return {"skipped": "no LoRA reference (diffusers' LoRA needs peft)"}
    model = _diffusers_transformer(cfg, folder, torch.float32, train=True,
                                   remat=cfg.model.remat_policy != "none")
    hidden, text, t, rope, x = _transformer_inputs(cfg, folder, torch.float32)
    target = _tensor(_theirs_layout(cfg, x["target"]), torch.float32)
    t_cfg = cfg.train
    cuda = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, betas=(t_cfg.adam_b1, t_cfg.adam_b2),
                                  eps=t_cfg.adam_eps, weight_decay=t_cfg.weight_decay, fused=cuda)
    autocast_dtype = _torch_dtype(cfg.model.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(_device(), dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = _call(cfg, model, hidden, text, t, rope)
        loss = torch.mean(torch.square(out.float() - target))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
        optimizer.step()
        return loss.detach()

    result, _ = _measure(step, repeats)
    return result


def edit(cfg, options: dict, folder: Path, repeats: int) -> dict:
    """The diffusers pipeline's denoising loop, InsViE-style: [noisy | source] channels, the three guidance
    branches batched in one model call per step, CogVideoXDPMScheduler, guidance on the model output (as the
    pipeline applies it), the per-step guidance scales ours used. Wan: `_wan_edit`."""
    import torch
    from diffusers import CogVideoXDPMScheduler

    if cfg.model.family == "wan":
        return _wan_edit(cfg, folder, repeats)

    dtype = _torch_dtype(cfg.model.dtype)
    model = _diffusers_transformer(cfg, folder, dtype, train=False, remat=False)
    x = read_inputs(folder)
    diff = cfg.diffusion
    scheduler = CogVideoXDPMScheduler(
        num_train_timesteps=diff.num_train_timesteps, beta_start=diff.beta_start, beta_end=diff.beta_end,
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        snr_shift_scale=diff.snr_shift_scale, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    source = _tensor(x["source"].transpose(0, 1, 4, 2, 3), dtype)
    text = _tensor(x["text"], dtype)
    noise = _tensor(x["noise"].transpose(0, 1, 4, 2, 3), dtype)
    rope = (_tensor(x["rope_cos"]), _tensor(x["rope_sin"])) if "rope_cos" in x else None
    text_scales, source_scales = x["text_scale"], x["source_scale"]
    source3 = torch.cat([torch.zeros_like(source), source, source])
    text3 = torch.cat([torch.zeros_like(text), torch.zeros_like(text), text])
    generator = torch.Generator(_device()).manual_seed(0)

    @torch.no_grad()
    def step():
        scheduler.set_timesteps(cfg.sample.steps, device=_device())
        timesteps = scheduler.timesteps
        latents, old_x0 = noise, None
        for i, t in enumerate(timesteps):
            v = model(hidden_states=torch.cat([torch.cat([latents] * 3), source3], dim=2),
                      encoder_hidden_states=text3, timestep=t.expand(3), image_rotary_emb=rope,
                      return_dict=False)[0].float()
            v_uu, v_cu, v_cc = v.chunk(3)
            v = v_uu + float(source_scales[i]) * (v_cu - v_uu) + float(text_scales[i]) * (v_cc - v_cu)
            latents, old_x0 = scheduler.step(v, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                             generator=generator, return_dict=False)
            latents = latents.to(dtype)
        return latents

    result, _ = _measure(step, repeats)
    return result


# ---------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKLCogVideoX


def _diffusers_vae(cfg, folder: Path, dtype):
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from insvie_jax.convert.vae_keys import diffusers_vae_config, vae_to_diffusers

    kwargs = {k: v for k, v in diffusers_vae_config(cfg.vae).items() if not k.startswith("_")}
    with torch.device(_device()):
        vae = AutoencoderKLCogVideoX(**kwargs).to(dtype).eval()
    flat = read_weights(folder)
    if flat is None:
        raise RuntimeError(f"{folder}: our side wrote no weights (run ours first)")
    _load_state(vae, vae_to_diffusers(flat), dtype)
    if cfg.vae.tiling:
        v = cfg.vae
        vae.enable_tiling(tile_sample_min_height=v.tile_sample_height, tile_sample_min_width=v.tile_sample_width,
                          tile_overlap_factor_height=v.tile_overlap_height,
                          tile_overlap_factor_width=v.tile_overlap_width)
        vae.enable_slicing()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return vae


def vae_encode(cfg, options: dict, folder: Path, repeats: int) -> dict:
    import torch

    dtype = _torch_dtype(cfg.vae.dtype)
    vae = _diffusers_vae(cfg, folder, dtype)
    video = _tensor(read_inputs(folder)["video"].transpose(0, 4, 1, 2, 3), dtype)
    result, out = _measure(torch.no_grad()(lambda: vae.encode(video).latent_dist.mean), repeats)
    return _compare(result, folder, _channels_last(out).transpose(0, 2, 3, 4, 1))


def vae_decode(cfg, options: dict, folder: Path, repeats: int) -> dict:
    import torch

    dtype = _torch_dtype(cfg.vae.dtype)
    vae = _diffusers_vae(cfg, folder, dtype)
    latents = _tensor(read_inputs(folder)["latents"].transpose(0, 4, 1, 2, 3), dtype)
    result, out = _measure(torch.no_grad()(lambda: vae.decode(latents).sample), repeats)
    return _compare(result, folder, _channels_last(out).transpose(0, 2, 3, 4, 1))


# ---------------------------------------------------------------------------------------------------
# T5 encoder (transformers) and attention (torch SDPA)


def t5(cfg, options: dict, folder: Path, repeats: int) -> dict:
    import torch
    import transformers

    from insvie_jax.convert.t5_keys import hf_config, t5_to_hf

    dtype = _torch_dtype(cfg.text_encoder.dtype)
    config = {k: v for k, v in hf_config(cfg.text_encoder).items() if k not in ("architectures",
                                                                                 "transformers_version")}
    with torch.device(_device()):
        model = transformers.T5EncoderModel(transformers.T5Config(**config)).to(dtype).eval()
    flat = read_weights(folder)
    if flat is None:
        raise RuntimeError(f"{folder}: our side wrote no weights (run ours first)")
    _load_state(model, t5_to_hf(flat, cfg.text_encoder), dtype, allow_missing=("encoder.embed_tokens.weight",))
    model.encoder.embed_tokens.weight = model.shared.weight
    ids = _tensor(read_inputs(folder)["ids"].astype(np.int64))
    result, out = _measure(torch.no_grad()(lambda: model(input_ids=ids).last_hidden_state), repeats)
    return _compare(result, folder, _channels_last(out))


def attention(cfg, options: dict, folder: Path, repeats: int) -> dict:
    """torch scaled_dot_product_attention (flash / memory-efficient kernels on CUDA), forward + backward."""
    import torch

    dtype = _torch_dtype(cfg.model.dtype)
    x = read_inputs(folder)
    q, k, v = (_tensor(x[n].transpose(0, 2, 1, 3), dtype).requires_grad_(True) for n in ("q", "k", "v"))

    def step():
        q.grad = k.grad = v.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().sum().backward()
        return out.detach()

    result, out = _measure(step, repeats)
    return _compare(result, folder, _channels_last(out).transpose(0, 2, 1, 3))


def wan_transformer_reference(f: int, h: int, w: int, repeats: int, median) -> dict:
    """diffusers' Wan2.2-TI2V-5B edit transformer on the GPU (bf16, random weights): forward, a 2-way guided step,
    fwd+bwd with gradient checkpointing; the reference side of `python -m insvie_jax.bench.wan torch`."""
    import diffusers
    import torch

    from insvie_jax.convert import wan_keys
    from insvie_jax.models.wan.config import WanModelConfig

    tokens = f * (h // 2) * (w // 2)
    kwargs = {k: v for k, v in wan_keys.diffusers_config(WanModelConfig()).items() if not k.startswith("_")}
    with torch.device("cuda"):
        model = diffusers.WanTransformer3DModel(**kwargs).to(torch.bfloat16)
    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__}

    def inputs(batch):
        x = torch.randn(batch, 96, f, h, w, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(batch, 512, 4096, device="cuda", dtype=torch.bfloat16)
        return x, torch.full((batch, tokens), 500.0, device="cuda"), text

    def sync(_):
        torch.cuda.synchronize()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30

    model.eval()
    with torch.no_grad():
        for batch, name in ((1, "forward"), (2, "guided_step")):
            x, t, text = inputs(batch)
            torch.cuda.reset_peak_memory_stats()
            rows[name] = median(lambda: model(x, t, text, return_dict=False)[0], sync, repeats)
            rows[name]["peak_gib"] = peak()
    model.train()
    model.enable_gradient_checkpointing()
    x, t, text = inputs(1)

    def fwdbwd():
        model.zero_grad(set_to_none=True)
        out = model(x, t, text, return_dict=False)[0]
        out.float().square().mean().backward()

    torch.cuda.reset_peak_memory_stats()
    rows["fwdbwd_checkpointing"] = median(fwdbwd, sync, repeats)
    rows["fwdbwd_checkpointing"]["peak_gib"] = peak()
    return rows


# Wan2.2-TI2V-5B-Diffusers' scheduler_config.json (UniPCMultistepScheduler).
WAN22_UNIPC = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
    prediction_type="flow_prediction", thresholding=False, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], use_flow_sigmas=True, flow_shift=5.0,
    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", use_karras_sigmas=False,
)


def _lucy_loop(model, noise, condition, text, negative, steps: int, text_scale: float, shift: float):
    """`LucyEditPipeline.__call__`'s denoising loop: per step the conditional and the unconditional transformer
    call with per-token timesteps (`expand_timesteps`), CFG on the flow prediction, `UniPCMultistepScheduler`
    (Wan2.2's config, `flow_shift`). Latents (B, C, F, H, W): noise float32, condition in the model dtype."""
    import diffusers
    import torch

    b, _, f, h, w = noise.shape
    p_t, p_h, p_w = model.config.patch_size
    tokens = (f // p_t) * (h // p_h) * (w // p_w)
    scheduler = diffusers.UniPCMultistepScheduler(**{**WAN22_UNIPC, "flow_shift": shift})
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = torch.cat([latents, condition.float()], dim=1).to(condition.dtype)
            timestep = t.expand(b, tokens)
            cond = model(x, timestep, text, return_dict=False)[0]
            uncond = model(x, timestep, negative, return_dict=False)[0]
            pred = uncond + text_scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def _wan_edit(cfg, folder: Path, repeats: int) -> dict:
    """The Wan edit as LucyEditPipeline samples it (lucy guidance), on our side's weights, noise and inputs."""
    import torch

    if cfg.sample.guidance != "lucy":
        return {"skipped": "no reference for 3-way guidance on Wan (LucyEditPipeline guides 2-way)"}
    dtype = _torch_dtype(cfg.model.dtype)
    model = _diffusers_transformer(cfg, folder, dtype, train=False, remat=False)
    x = read_inputs(folder)
    noise = _tensor(_theirs_layout(cfg, x["noise"]), torch.float32)
    source = _tensor(_theirs_layout(cfg, x["source"]), dtype)
    text, negative = _tensor(x["text"], dtype), _tensor(x["negative"], dtype)

    def step():
        return _lucy_loop(model, noise, source, text, negative, cfg.sample.steps, cfg.sample.text_scale,
                          cfg.diffusion.flow_shift)

    result, out = _measure(step, repeats)
    return _compare(result, folder, _ours_layout(cfg, out))


def wan_sampling_loop_reference(f: int, h: int, w: int, steps: int, text_scale: float = 5.0) -> dict:
    """LucyEditPipeline's denoising loop on the GPU (bf16, random 5B edit weights, `_lucy_loop`), timed once after
    a 2-step warm-up: the reference side of `bench.wan torch --loop N`."""
    import diffusers
    import torch

    from insvie_jax.convert import wan_keys
    from insvie_jax.models.wan.config import WanModelConfig

    kwargs = {k: v for k, v in wan_keys.diffusers_config(WanModelConfig()).items() if not k.startswith("_")}
    with torch.device("cuda"):
        model = diffusers.WanTransformer3DModel(**kwargs).to(torch.bfloat16).eval()
    gen = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(1, 48, f, h, w, device="cuda", dtype=torch.float32, generator=gen)
    condition = torch.randn(1, 48, f, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    negative = torch.zeros_like(text)

    def loop(n):
        out = _lucy_loop(model, noise, condition, text, negative, n, text_scale, 5.0)
        torch.cuda.synchronize()
        return out

    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    loop(2)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loop(steps)
    rows[f"sample_loop_{steps}"] = {"s": time.perf_counter() - start,
                                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return rows
