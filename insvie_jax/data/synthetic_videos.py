"""Synthetic editing triplets in pixels: moving shapes on a plain background, edited as an instruction says.

Each triplet is a scene (background colour; a circle and a square, sometimes a triangle; each of its own colour,
size and straight-line motion) rendered twice: as it is (the source) and with one instruction of `INSTRUCTIONS`
applied (the edit), e.g. "make the circle red" repaints the circle, "remove the square" leaves it out. Outside
what the instruction names the two renders are identical pixel for pixel. Everything is a function of
(seed, triplet index).

`write_triplets` writes them as mp4 clips plus an InsViE CSV (the `data.source: video` / `insvie-jax encode`
input layout); data/prepare.py does that and encodes them when `data.generate` asks for it (the default run).
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np

from insvie_jax import storage

# Instruction -> (what it changes, new colour or None for "remove").
INSTRUCTIONS = {
    "make the circle red": ("circle", (220, 30, 30)),
    "make the square green": ("square", (30, 200, 60)),
    "remove the square": ("square", None),
    "remove the circle": ("circle", None),
    "make the background blue": ("background", (30, 60, 200)),
    "make the background white": ("background", (245, 245, 245)),
}
# Source colours: none of them is an instruction's target colour, so every edit changes something.
BACKGROUNDS = [(90, 90, 90), (60, 80, 60), (120, 100, 80), (40, 40, 60)]
SHAPE_COLOURS = [(240, 220, 40), (40, 220, 230), (220, 60, 220), (250, 150, 30), (150, 110, 250)]
DRAW_ORDER = ("triangle", "square", "circle")  # later shapes cover earlier ones


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # "circle" | "square" | "triangle"
    colour: tuple[int, int, int]
    size: float  # radius (circle), half side (square, triangle), pixels
    start: tuple[float, float]  # centre (y, x) at the first frame
    end: tuple[float, float]  # centre at the last frame


@dataclasses.dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


def random_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    kinds = ["circle", "square"] + (["triangle"] if rng.random() < 0.5 else [])
    colours = rng.choice(len(SHAPE_COLOURS), len(kinds), replace=False)
    shapes = []
    for kind, colour in zip(kinds, colours):
        size = rng.uniform(0.12, 0.2) * height
        lo, hi = (size, size), (height - size, width - size)
        shapes.append(Shape(kind, SHAPE_COLOURS[colour], size, tuple(rng.uniform(lo, hi)), tuple(rng.uniform(lo, hi))))
    return Scene(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], tuple(shapes))


def shape_mask(shape: Shape, num_frames: int, height: int, width: int) -> np.ndarray:
    """bool (F, H, W): where the shape covers each frame (pixel centres inside it)."""
    t = np.linspace(0.0, 1.0, num_frames)[:, None, None]
    cy = shape.start[0] + t * (shape.end[0] - shape.start[0])
    cx = shape.start[1] + t * (shape.end[1] - shape.start[1])
    y = np.arange(height)[None, :, None] + 0.5 - cy
    x = np.arange(width)[None, None, :] + 0.5 - cx
    s = shape.size
    if shape.kind == "circle":
        return y**2 + x**2 <= s**2
    if shape.kind == "square":
        return (np.abs(y) <= s) & (np.abs(x) <= s)
    return (y <= s) & (y >= -s) & (np.abs(x) <= (y + s) / 2)  # apex up, base 2s wide


def render(scene: Scene, num_frames: int, height: int, width: int, instruction: str | None = None) -> np.ndarray:
    """uint8 (F, H, W, 3): the scene, with `instruction` (a key of INSTRUCTIONS) applied if given."""
    target, colour = INSTRUCTIONS[instruction] if instruction else (None, None)
    background = colour if target == "background" else scene.background
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = background
    for shape in sorted(scene.shapes, key=lambda s: DRAW_ORDER.index(s.kind)):
        fill = shape.colour
        if shape.kind == target:
            if colour is None:
                continue
            fill = colour
        frames[shape_mask(shape, num_frames, height, width)] = fill
    return frames


def applicable(scene: Scene) -> list[str]:
    """The instructions that name something in the scene."""
    kinds = {s.kind for s in scene.shapes} | {"background"}
    return [i for i, (target, _) in INSTRUCTIONS.items() if target in kinds]


def triplet(seed: int, index: int, num_frames: int, height: int, width: int,
            instructions: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(source, edit, instruction) of triplet `index`: uint8 clips and a key of INSTRUCTIONS."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng, height, width)
    choices = [i for i in applicable(scene) if instructions is None or i in instructions]
    instruction = choices[rng.integers(len(choices))]
    return (render(scene, num_frames, height, width),
            render(scene, num_frames, height, width, instruction), instruction)


def write_triplets(folder, count: int, num_frames: int, height: int, width: int, fps: float,
                   seed: int = 0, instructions: list[str] | None = None):
    """Writes `count` triplets as folder/{source,edit}/NNNNN.mp4 and folder/triplets.csv (InsViE layout);
    returns the CSV's path. The CSV is written last, so its presence means the folder is complete."""
    from insvie_jax.data.video import write_video  # PyAV: only where clips are written

    folder = storage.path(folder)
    unknown = sorted(set(instructions or []) - set(INSTRUCTIONS))
    if unknown:
        raise ValueError(f"unknown synthetic instructions {unknown}: choose from {sorted(INSTRUCTIONS)}")
    for sub in ("source", "edit"):
        storage.makedirs(folder / sub)
    rows = []
    for index in range(count):
        source, edit, instruction = triplet(seed, index, num_frames, height, width, instructions)
        name = f"{index:05d}.mp4"
        write_video(folder / "source" / name, source, fps)
        write_video(folder / "edit" / name, edit, fps)
        rows.append([name, "moving shapes", instruction, "moving shapes, edited", "edit"])
    path = folder / "triplets.csv"
    write_insvie_csv(path, rows)
    return path


def write_insvie_csv(path, rows: list[list[str]]) -> None:
    """An InsViE triplet list: a header, then (video, caption, instruction, edited_caption, edit_folder) rows;
    written at once (one write of the whole text)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["video", "caption", "instruction", "edited_caption", "edit_folder"])
    writer.writerows(rows)
    storage.write_text_whole(path, text.getvalue())


VAL_SEED_OFFSET = 1_000_000  # validation scenes: a generator seed no training folder uses


def validation_folders(cfg) -> list:
    """The held-out scenes' shard folders (data.generate_val > 0): <folder>/val of each data.paths folder."""
    d = cfg.data
    if not (d.generate and d.generate_val):
        return []
    return [storage.path(p) / "val" for p in (d.paths or [str(storage.path(cfg.train.run_dir) / "data")])]


def instructions_of(folder) -> dict[str, str]:
    """{clip name: instruction} of a generated folder's triplets (empty when it has no CSV)."""
    path = storage.path(folder) / "videos" / "triplets.csv"
    if not path.exists():
        return {}
    return {row["video"]: row["instruction"] for row in csv.DictReader(io.StringIO(path.read_text()))}
