"""A whole Wan edit (sample/wan_edit.py) equals diffusers' `LucyEditPipeline` end to end.

Both sides get the same tiny random models (a Wan2.2-layout VAE, the edit transformer, a UMT5 text encoder),
the same source video, prompts and starting noise: diffusers runs its pipeline (VAE encode argmax,
latent normalisation, UniPC with Wan's settings, TI2V per-token timesteps, 2-way CFG, decode), given the
prompt embeddings as its `_get_t5_prompt_embeds` forms them from transformers' UMT5 (no tokenizer files
exist here); ours encodes the same token ids with our UMT5 (`prompt_states`) and runs `wan_edit.edit` in one
jit. Tolerance: the decoded video ≤ VIDEO_TOL relative error ‖a−b‖/‖b‖, fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from insvie_jax.config import WanVAEConfig  # noqa: E402
from insvie_jax.convert import umt5_keys, wan_vae_keys  # noqa: E402
from insvie_jax.models import umt5  # noqa: E402
from insvie_jax.models.params import module_from_flat  # noqa: E402
from insvie_jax.models.wan import vae as wan_vae  # noqa: E402
from insvie_jax.sample import wan_edit  # noqa: E402
from _compare import rel  # noqa: E402
from _parity import diffusers_model, wan_vae_gammas_and_biases  # noqa: E402
from test_wan_flow import SHIFT, WAN_UNIPC  # noqa: E402
from test_wan_lora import ours_from  # noqa: E402
from test_wan_transformer import TINY, reference  # noqa: E402

VIDEO_TOL = 1e-4
LATENT_TOL = 1e-5
STEPS = 3
SCALE = 5.0
Z = 6  # latent channels (VAE z_dim = the transformer's in/out channels)
TEXT_LENGTH = TINY.text_length
MODEL = dataclasses.replace(TINY, in_channels=Z, out_channels=Z)
_stats = np.random.default_rng(5)
VAE = WanVAEConfig(base_dim=5, decoder_base_dim=7, z_dim=Z, num_res_blocks=1, dtype="float32",
                   encode_frame_batch=4, decode_frame_batch=1,
                   latents_mean=[float(v) for v in _stats.normal(size=Z)],
                   latents_std=[float(v) for v in _stats.uniform(0.5, 2.0, Z)])
BATCH, FRAMES, HEIGHT, WIDTH = 2, 5, 32, 64  # latents (2, 2, 2, 4, Z): 2 x 1 x 2 patch tokens


def reference_vae():
    return diffusers_model(diffusers.AutoencoderKLWan, wan_vae_keys.diffusers_vae_config(VAE), 3,
                           wan_vae_gammas_and_biases)


def reference_text_encoder():
    torch.manual_seed(4)
    config = transformers.UMT5Config(vocab_size=61, d_model=TINY.text_embed_dim, d_kv=8, num_heads=3, num_layers=2,
                                     d_ff=26, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return transformers.UMT5EncoderModel(config).eval()


def diffusers_prompt_embeds(encoder, ids, mask):
    """As `LucyEditPipeline._get_t5_prompt_embeds`: states of the prompt's tokens, zero-padded to the length."""
    with torch.no_grad():
        states = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state
    lengths = mask.sum(1)
    return torch.stack([torch.cat([u[:n], u.new_zeros(TEXT_LENGTH - n, u.shape[1])]) for u, n in zip(states, lengths)])


def token_ids(seed: int, lengths):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 61, (len(lengths), TEXT_LENGTH)).astype(np.int64)
    mask = (np.arange(TEXT_LENGTH)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


@pytest.fixture(scope="module")
def models():
    """(diffusers pipeline, our transformer, VAE, UMT5) with the same tiny random weights."""
    ref_transformer = reference(MODEL, seed=31)
    ref_vae = reference_vae()
    ref_text = reference_text_encoder()
    pipe = diffusers.LucyEditPipeline(tokenizer=None, text_encoder=ref_text, vae=ref_vae,
                                      scheduler=diffusers.UniPCMultistepScheduler(**WAN_UNIPC),
                                      transformer=ref_transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    transformer = ours_from(ref_transformer, MODEL)
    vae = module_from_flat(wan_vae.abstract(VAE),
                           wan_vae_keys.vae_from_diffusers({k: v.numpy() for k, v in ref_vae.state_dict().items()}))
    text_cfg = umt5.umt5_xxl_config(dtype="float32", vocab_size=61, d_model=TINY.text_embed_dim, d_kv=8, num_heads=3,
                                    num_layers=2, d_ff=26, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=20, max_length=TEXT_LENGTH)
    encoder = module_from_flat(umt5.abstract(text_cfg),
                               umt5_keys.umt5_from_hf({k: v.numpy() for k, v in ref_text.state_dict().items()},
                                                      text_cfg))
    return pipe, transformer, vae, encoder


def edit_inputs(seed: int):
    """(source video in [0, 1], starting noise, prompt ids and mask, negative prompt ids and mask)."""
    rng = np.random.default_rng(seed)
    video01 = rng.uniform(0, 1, (BATCH, FRAMES, HEIGHT, WIDTH, 3)).astype(np.float32)
    noise = rng.standard_normal((BATCH, (FRAMES - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16, Z)).astype(np.float32)
    return video01, noise, token_ids(seed + 1, [5, 3]), token_ids(seed + 2, [2, 2])


def run_diffusers(pipe, video01, noise, prompt, negative, guidance_scale, output_type):
    """The pipeline's result, channels-last: video in [0, 1] or (output_type "latent") the final latents."""
    encoder = pipe.text_encoder
    with torch.no_grad():
        out = pipe(video=torch.from_numpy(video01).permute(0, 1, 4, 2, 3),  # [0, 1], (B, F, C, H, W)
                   prompt_embeds=diffusers_prompt_embeds(encoder, *prompt),
                   negative_prompt_embeds=diffusers_prompt_embeds(encoder, *negative),
                   height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
                   guidance_scale=guidance_scale, latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3),
                   output_type=output_type, max_sequence_length=TEXT_LENGTH).frames
    return out.permute(0, 1, 3, 4, 2).numpy() if output_type == "pt" else out.permute(0, 2, 3, 4, 1).numpy()


def test_lucy_edit_pipeline_matches_diffusers(models):
    pipe, transformer, vae, encoder = models
    pipe.scheduler = diffusers.UniPCMultistepScheduler(**WAN_UNIPC)
    video01, noise, prompt, negative = edit_inputs(32)
    want = run_diffusers(pipe, video01, noise, prompt, negative, SCALE, "pt")  # (B, F, H, W, 3) in [0, 1]

    text = umt5.prompt_states(encoder, *prompt)
    negative_text = umt5.prompt_states(encoder, *negative)
    settings = wan_edit.WanEditSettings(sampler="flow_unipc", steps=STEPS, shift=SHIFT, guidance="lucy",
                                        text_scale=SCALE)
    t_graph, t_state = nnx.split(transformer)
    v_graph, v_state = nnx.split(vae)

    # XLA's backend optimisations off: compiling dominates this CPU test.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(transformer_state, vae_state, video, text, negative_text, noise):
        return wan_edit.edit(nnx.merge(t_graph, transformer_state), nnx.merge(v_graph, vae_state), VAE, video, text,
                             negative_text, settings, noise=noise)

    got = np.asarray(run(t_state, v_state, 2 * video01 - 1, text, negative_text, noise))
    assert got.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 3)
    assert np.mean(np.abs(got) < 1) > 0.5  # the decoder's clamp leaves most pixels alone: the numbers count
    assert rel(got * 0.5 + 0.5, want) <= VIDEO_TOL, rel(got * 0.5 + 0.5, want)


def test_insvie_guidance_at_unit_scales_is_diffusers_conditional_euler_edit(models):
    """3-way guidance with both scales 1 is the conditional branch alone: diffusers without CFG (scale 1), here
    with the flow Euler sampler; compared on the final latents."""
    pipe, transformer, vae, encoder = models
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    video01, noise, prompt, negative = edit_inputs(35)
    want = run_diffusers(pipe, video01, noise, prompt, negative, 1.0, "latent")

    settings = wan_edit.WanEditSettings(sampler="flow_euler", steps=STEPS, shift=SHIFT, guidance="insvie",
                                        text_scale=1.0, source_scale=1.0)
    with torch.no_grad():  # the pipeline's condition latents (the VAE path is the test above's)
        mode = pipe.vae.encode(torch.from_numpy(2 * video01 - 1).permute(0, 4, 1, 2, 3)).latent_dist.mode()
    source = (mode.permute(0, 2, 3, 4, 1).numpy() - np.float32(VAE.latents_mean)) / np.float32(VAE.latents_std)
    t_graph, t_state = nnx.split(transformer)
    run = jax.jit(lambda state, *args: wan_edit.sample_latents(nnx.merge(t_graph, state), *args, settings=settings),
                  compiler_options={"xla_backend_optimization_level": 0})
    got = run(t_state, source, umt5.prompt_states(encoder, *prompt), None, noise)
    assert rel(got, want) <= LATENT_TOL, rel(got, want)


def test_bad_settings_and_inputs_name_the_fix():
    with pytest.raises(ValueError, match="sample.guidance"):
        wan_edit.WanEditSettings(guidance="cfg")
    with pytest.raises(ValueError, match="sample.sampler"):
        wan_edit.WanEditSettings(sampler="ddim")
    with pytest.raises(ValueError, match="exactly one of"):
        wan_edit.edit(None, None, VAE, np.zeros((1, 5, 32, 32, 3)), None, None, wan_edit.WanEditSettings())


def test_mismatched_text_width_names_both_sides(models):
    _, transformer, vae, _ = models
    text = np.zeros((1, TEXT_LENGTH, TINY.text_embed_dim + 1), np.float32)
    with pytest.raises(ValueError, match="model.text_embed_dim"):
        wan_edit.edit(transformer, vae, VAE, np.zeros((1, FRAMES, HEIGHT, WIDTH, 3), np.float32), text, None,
                      wan_edit.WanEditSettings(), key=jax.random.key(0))
