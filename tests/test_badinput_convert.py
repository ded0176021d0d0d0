"""Bad checkpoints found by trying `insvie-jax convert`: every one ends in one line that names the file and the
fix, exit status 2, no traceback, and nothing written at the destination."""

import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from insvie_jax import cli
from insvie_jax import config as configlib
from insvie_jax.convert import api, t5_keys, vae_keys
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import param_shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny transformer in the three formats, plus the tiny VAE (diffusers) and T5 (hf); values do not matter."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = configlib.load("tiny")
    rng = np.random.default_rng(0)

    def draw(shapes):
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    flat = draw(param_shapes(tr.abstract(cfg.model)))
    for fmt, name in (("native", "native"), ("diffusers", "diffusers"), ("sat", "sat.pt")):
        api.write_flat(flat, cfg.model, root / name, fmt)
    vae_keys.write_vae(draw(vae_keys.vae_shapes(cfg.vae)), cfg.vae, root / "vae", "diffusers")
    t5_keys.write_t5(draw(t5_keys._our_shapes(cfg.text_encoder)), cfg.text_encoder, root / "t5", "hf")
    return root, cfg


def _convert(capsys, *argv) -> tuple[int, list[str]]:
    """`insvie-jax convert ...` in this process (fast enough for hundreds of inputs): status and stderr lines."""
    code = cli.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    return code, [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "tensor/s]" not in line]


def _fuzz_inputs(rng, valid_zip: bytes, valid_legacy: bytes):
    for i in range(200):
        kind = i % 5
        if kind == 0:
            yield "random", rng.bytes(int(rng.integers(0, 4000)))
        elif kind == 1:
            yield "truncated zip", valid_zip[: int(rng.integers(0, len(valid_zip)))]
        elif kind == 2:
            yield "truncated legacy", valid_legacy[: int(rng.integers(0, len(valid_legacy)))]
        elif kind == 3:  # a pickle header, then noise: what drives the unpickler into its odd errors
            yield "pickle noise", bytes([0x80, int(rng.integers(2, 6))]) + rng.bytes(int(rng.integers(1, 300)))
        else:  # one byte of a valid file flipped
            data = bytearray(valid_legacy)
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
            yield "flipped", bytes(data)


def test_fuzzed_pt_files_each_get_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    state = {"module": {"model.diffusion_model.w": torch.arange(64, dtype=torch.float32)}}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for i, (kind, data) in enumerate(_fuzz_inputs(rng, zipped.getvalue(), legacy.getvalue())):
        src = tmp_path / f"fuzz{i}.pt"
        src.write_bytes(data)
        code, lines = _convert(capsys, src, tmp_path / f"out{i}")
        assert code == 2, (kind, i, lines)
        assert len(lines) == 1 and lines[0].startswith(f"insvie-jax: {src}"), (kind, i, lines)
        assert not (tmp_path / f"out{i}").exists()


def test_truncated_safetensors_are_named(tiny, tmp_path, capsys):
    root, _ = tiny
    for folder, weights in (("diffusers", "diffusion_pytorch_model.safetensors"),
                            ("vae", "diffusion_pytorch_model.safetensors"), ("t5", "model.safetensors")):
        broken = tmp_path / folder
        shutil.copytree(root / folder, broken)
        data = (broken / weights).read_bytes()
        (broken / weights).write_bytes(data[: len(data) // 2])
        code, lines = _convert(capsys, broken, tmp_path / f"out-{folder}")
        assert code == 2 and len(lines) == 1, lines
        assert str(broken) in lines[0] and "not a readable safetensors file" in lines[0], lines
        assert not (tmp_path / f"out-{folder}").exists()


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("how", ["protocol2", "protocol4", "torch.save", "torch.save legacy"])
def test_pickle_that_would_run_code_is_refused_as_unsafe(how, tmp_path, capsys):
    marker = tmp_path / "ran"
    src = tmp_path / "evil.pt"
    payload = {"module": {"w": RunsCode(marker)}}
    if how.startswith("protocol"):
        src.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    else:
        torch.save(payload, src, _use_new_zipfile_serialization=how == "torch.save")
    code, lines = _convert(capsys, src, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert f"{src} was refused as unsafe: its pickle would import posix.mkdir" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_diffusers_tensor_of_the_wrong_shape_is_named(tiny, tmp_path, capsys):
    root, _ = tiny
    broken = tmp_path / "diffusers"
    shutil.copytree(root / "diffusers", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["transformer_blocks.1.ff.net.0.proj.weight"] = np.zeros((5, 7), np.float32)
    save_file(sd, weights)
    code, lines = _convert(capsys, broken, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "transformer_blocks.1.ff.net.0.proj.weight: expected (128, 32), found (5, 7)" in lines[0]


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# Runs `insvie-jax convert` once per argv (one process, so one start-up) and prints each status and stderr.
CONVERT_EACH = """
import contextlib, io, json, sys
from insvie_jax import cli
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["convert", *argv])
    print(json.dumps([code, err.getvalue()]))
"""


def _convert_each(argvs, env, prefix=(), before="", after="", block_torch=False):
    """[(status, stderr lines)] of each conversion, and the rest of stdout (what `after` printed)."""
    script = (f"{before}{sys.executable} -c '{BLOCK_TORCH if block_torch else ''}{CONVERT_EACH}' "
              f"'{json.dumps(argvs)}'{after}")
    out = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    rest = [line for line in out.stdout.splitlines() if not line.startswith("[")]
    return [(code, [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "tensor/s]" not in ln])
            for code, err in results], rest


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and tmpfs mounts (user namespaces)")
def test_full_disk_says_no_space_and_writes_nothing(tiny, tmp_path, env):
    """Real full filesystems: tmpfs mounts in a private mount namespace. One too small for the tensors (checked
    before writing); two with room for the tensors but not for the files (the disk fills up during the write)."""
    root, cfg = tiny
    nbytes = sum(math.prod(s) for s in param_shapes(tr.abstract(cfg.model)).values()) * 4
    just_too_small = f"{(nbytes // 4096 + 2) * 4}k"  # room for the tensors, not for headers and config.json
    cases = [("64k", "native", "out"), (just_too_small, "diffusers", "out"), (just_too_small, "sat", "out.pt")]
    disks = [tmp_path / f"disk{i}" for i in range(len(cases))]
    mounts = ""
    for disk, (size, _, _) in zip(disks, cases):
        disk.mkdir()
        mounts += f"mount -t tmpfs -o size={size} tmpfs {disk} && "
    argvs = [[str(root / "native"), str(disk / dst), "--to", to] for disk, (_, to, dst) in zip(disks, cases)]
    left = "".join(f"; echo left: $(ls -A {disk})" for disk in disks)
    results, rest = _convert_each(argvs, env, prefix=("unshare", "-rm"), before=mounts, after=left)
    assert len(results) == len(cases) and rest == ["left:"] * len(cases), rest
    for disk, (size, to, dst), (code, lines) in zip(disks, cases, results):
        assert code == 2, (size, to, lines)
        assert lines == [f"insvie-jax: no space left on {disk}{' (needs at least 0.2 MiB)' if size == '64k' else ''}; "
                         f"nothing written to {disk / dst}: free some space or choose another destination"], lines


BLOCK_TORCH = "import sys; sys.modules[\"torch\"] = None  # as if not installed\n"


def test_without_torch_sat_says_how_to_install_it(tiny, tmp_path, env):
    root, _ = tiny
    argvs = [[str(root / "native"), str(tmp_path / "out"), "--to", "sat"], [str(root / "sat.pt"), str(tmp_path / "o")]]
    for code, lines in _convert_each(argvs, env, block_torch=True)[0]:
        assert code == 2 and lines == ["insvie-jax: SAT (.pt) checkpoints need PyTorch, which is not installed: "
                                       "pip install 'insvie-jax[convert]'"], lines
    assert not (tmp_path / "out").exists()


def test_wan_codecs_name_bad_files_in_one_line(tmp_path, capsys):
    """The Wan codecs of the registry: an unsupported Wan config and a LoRA key on no adapted projection."""
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", "image_dim": 1280}))
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 4), np.float32),
               "transformer.blocks.0.norm3.lora_A.weight": np.zeros((2, 4), np.float32)}, lora)
    for src, says in ((folder, "image_dim=1280 is not supported"),
                      (lora, "module 'norm3' is not one this model adapts")):
        code, lines = _convert(capsys, src, tmp_path / "out", "--to", "diffusers" if src == folder else "comfyui")
        assert code == 2 and len(lines) == 1 and lines[0].startswith("insvie-jax: ") and says in lines[0], lines
        assert not (tmp_path / "out").exists()
