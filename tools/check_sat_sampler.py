"""Cross-checks our `dpmpp_2m_sde` sampling against InsViE's own SAT code, step by step.

Runs SAT's `VPSDEDPMPP2MSampler` + `DiscreteDenoiser` (VideoScaling, a snapped to the 1000-table) +
`DynamicCFG_edit` (7.5 / 1.2, exp 5, 50 steps) from an InsViE checkout on a small fake network, and our plan,
guidance and step functions on the same network and noise; prints the per-step relative error of x.

    python tools/check_sat_sampler.py /path/to/InsViE [--out result.json]

Needs torch (CPU). SAT's package `__init__` (heavy model imports) is bypassed; `omegaconf` and `einops`
are stubbed when absent (the code path used does not touch them).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from insvie_jax.config import DiffusionConfig, SampleConfig
from insvie_jax.diffusion import guidance, samplers
from insvie_jax.sample import loop


def import_sat(repo: Path):
    sgm = repo / "CogVideo" / "sat" / "sgm"
    for name, path in (("sgm", sgm), ("sgm.modules", sgm / "modules"),
                       ("sgm.modules.diffusionmodules", sgm / "modules" / "diffusionmodules")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    for name, attrs in (("omegaconf", ("ListConfig", "OmegaConf")), ("einops", ("rearrange", "repeat"))):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            for attr in attrs:
                setattr(stub, attr, type(attr, (), {}))
            sys.modules[name] = stub
    from sgm.modules.diffusionmodules.denoiser import DiscreteDenoiser
    from sgm.modules.diffusionmodules.sampling import VPSDEDPMPP2MSampler
    return VPSDEDPMPP2MSampler, DiscreteDenoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("insvie_repo", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    Sampler, Denoiser = import_sat(args.insvie_repo)
    prefix = "sgm.modules.diffusionmodules."
    disc = {"target": prefix + "discretizer.ZeroSNRDDPMDiscretization", "params": {"shift_scale": 3.0}}
    guider = {"target": prefix + "guiders.DynamicCFG_edit",
              "params": {"scale": 7.5, "scale_img": 1.2, "exp": 5, "num_steps": 50}}
    sampler = Sampler(num_steps=50, discretization_config=disc, guider_config=guider, device="cpu")
    denoiser = Denoiser({"target": prefix + "denoiser_weighting.EpsWeighting"},
                        {"target": prefix + "denoiser_scaling.VideoScaling"}, 1000, disc, quantize_c_noise=False)

    b, t, c, h, w, length, dim = 1, 3, 16, 4, 6, 5, 8

    def torch_net(inp, timestep, cond, **_):  # SAT layout (B, T, C, H, W), noisy and source on channels
        x, z = inp[:, :, :c], inp[:, :, c:]
        text = cond["crossattn"].mean((1, 2))[:, None, None, None, None]
        return 0.5 * torch.tanh(x) + 0.3 * z + 0.2 * text + 1e-4 * timestep[:, None, None, None, None]

    def jax_net(noisy, source, text, timestep):
        text = text.mean((1, 2))[:, None, None, None, None]
        return 0.5 * jnp.tanh(noisy) + 0.3 * source + 0.2 * text + 1e-4 * timestep[:, None, None, None, None]

    states = []
    sat_step = sampler.sampler_step

    def recording_step(*a, **k):
        out = sat_step(*a, **k)
        states.append(out[0].clone())
        return out

    sampler.sampler_step = recording_step
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(b, t, c, h, w, generator=gen), torch.randn(b, t, c, h, w, generator=gen)
    text = torch.randn(b, length, dim, generator=gen)
    torch.manual_seed(123)  # SAT draws its step noise from the global generator
    sampler(lambda i, s, cond, **k: denoiser(torch_net, i, s, cond, **k), x.clone(), z, {"crossattn": text},
            uc={"crossattn": torch.zeros_like(text)})

    def channels_last(a):
        return jnp.asarray(a.numpy().transpose(0, 1, 3, 4, 2))

    twin = torch.Generator().manual_seed(123)
    plan, rows = loop.plan_rows(SampleConfig(), DiffusionConfig())
    source3, text3 = guidance.branch_inputs(channels_last(z), jnp.asarray(text.numpy()))
    xj = channels_last(x)
    prev = jnp.zeros_like(xj)
    errors = []
    for i in range(plan.num_steps):
        row = {k: v[i] for k, v in rows.items()}
        # SAT draws once on the first step, twice on second-order steps (keeps the last), never on the last.
        draws = [torch.randn(b, t, c, h, w, generator=twin) for _ in range(0 if i == 49 else 1 if i == 0 else 2)]
        x0 = guidance.guided_x0(jax_net, xj, source3, text3, row["timestep"], row["c_skip"], row["c_out"],
                                row["text_scale"], row["source_scale"])
        xj, prev = samplers.step(row, xj, x0, prev, channels_last(draws[-1]) if draws else None), x0
        ref = channels_last(states[i])
        errors.append(float(jnp.linalg.norm(xj - ref) / jnp.linalg.norm(ref)))
    print("step  rel_err(x)")
    for i in range(0, 50, 7):
        print(f"{i:4d}  {errors[i]:.2e}")
    print(f"max {max(errors):.2e} at step {int(np.argmax(errors))}; final {errors[-1]:.2e}")
    if args.out:
        args.out.write_text(json.dumps({"per_step_rel_err": errors}))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()
