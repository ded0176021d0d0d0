"""What `insvie-jax eval` measures: (source, edited video, instruction, optional target and captions) items from
a CSV or an `insvie-jax edit` output folder, and their clips decoded and aligned.

Lists (paths relative to the list's folder unless absolute):
- an eval CSV: a header naming `source`, `edit` and `instruction`, optionally `target`, `source_caption`,
  `edited_caption` (other columns are ignored); a pair CSV (`source`, `target`, `instruction`, the data lists'
  format) is read as a dataset: its `target` is the dataset's edit, as below;
- an InsViE CSV (header, then video name, source caption, instruction, edited caption[, edit folder]): the source
  is `<video_roots[0]>/<name>`; the edited video is the edit command's `<edits>/<name stem>-<instruction>/edit.mp4`
  when `edits` is given (then the dataset's `<video_roots[1]>/<name>` is the target, when it exists), else the
  dataset's own edited clip `<video_roots[1]>/<name>` (no target); the edit command's 2-column batch file
  (video name, instruction) reads the same way;
- no list, only `edits`: every `<edits>/*/meta.json` that `insvie-jax edit` wrote (source and instruction from it).

Alignment: the edit command resizes the source to cover its size (bicubic), centre-crops it and keeps its first
4k+1 frames, so the source and target are resized and cropped the same way to the edit's size, and all three
are cut to the frame count they share.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from insvie_jax.config import ConfigError
from insvie_jax.data.video import probe, read_frames, resize_crop

EVAL_COLUMNS = ("source", "edit", "instruction")
OPTIONAL_COLUMNS = ("target", "source_caption", "edited_caption")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    name: str
    source: str
    edit: str
    instruction: str
    target: str | None = None
    source_caption: str | None = None
    edited_caption: str | None = None


class ListError(ConfigError):
    """A list that cannot be read at all (a bad row only fails its item)."""


def _resolve(folder: Path, path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else folder / p)


def _edited_and_target(dataset_edit: str | None, source: str, instruction: str, edits, where: str):
    """(what is measured, target): the edit command's output for the row when `edits` is given (the dataset's
    edited clip, when it exists, is then the target), else the dataset's edited clip itself."""
    if edits is not None:
        from insvie_jax.sample.edit import output_name  # the models' module: imported only when needed

        edit = str(Path(edits) / output_name(source, instruction) / "edit.mp4")
        return edit, dataset_edit if dataset_edit and Path(dataset_edit).is_file() else None
    if dataset_edit is None:
        raise ListError(f"{where}: name the edited clips' folder (--video-roots SOURCE EDITED) or the edit command's "
                        "output (--edits)")
    return dataset_edit, None


def read_csv(path: str | Path, video_roots=("source", "edit"), edits: str | Path | None = None) -> list[EvalItem]:
    """The items of an eval CSV, a pair CSV (source, target, instruction) or an InsViE CSV (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval list not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ListError(f"{path} is empty: it needs a header and one row per edit")
    header = [c.strip().lower() for c in rows[0]]
    folder = path.parent
    items = []
    if "source" in header and "instruction" in header and ("edit" in header or "target" in header):
        for number, row in enumerate(rows[1:], 2):
            fields = {k: v for k, v in zip(header, (cell.strip() for cell in row)) if v}
            where = f"{path.name}:{number}"
            if not all(k in fields for k in ("source", "instruction", "edit" if "edit" in header else "target")):
                raise ListError(f"{path}:{number}: every row needs source, instruction and edit (or target)")
            source, instruction = _resolve(folder, fields["source"]), fields["instruction"]
            target = _resolve(folder, fields["target"]) if "target" in fields else None
            if "edit" in fields:
                edit = _resolve(folder, fields["edit"])
            else:  # a pair list: the target column is the dataset's edit
                edit, target = _edited_and_target(target, source, instruction, edits, where)
            items.append(EvalItem(where, source, edit, instruction, target, fields.get("source_caption"),
                                  fields.get("edited_caption")))
        return items
    if len(header) < 2:
        raise ListError(f"{path}: expected an eval CSV (columns {', '.join(EVAL_COLUMNS)}[, "
                        f"{', '.join(OPTIONAL_COLUMNS)}]), a pair CSV (source, target, instruction) or an InsViE CSV "
                        "(video, caption, instruction, edited caption, edit folder)")
    roots = list(video_roots)
    for number, row in enumerate(rows[1:], 2):
        row = [cell.strip() for cell in row]
        # InsViE's columns; the edit command's 2-column batch file is (video, instruction)
        padded = row + [""] * 4
        name, caption, instruction, edited_caption = padded[:4] if len(row) >= 3 else (row[0], "", padded[1], "")
        if not name or not instruction:
            raise ListError(f"{path}:{number}: an InsViE row needs a video name and an instruction")
        source = _resolve(folder, str(Path(roots[0]) / name))
        dataset_edit = _resolve(folder, str(Path(roots[1]) / name)) if len(roots) > 1 else None
        edit, target = _edited_and_target(dataset_edit, source, instruction, edits, f"{path.name}:{number}")
        items.append(EvalItem(f"{path.name}:{number}:{name}", source, edit, instruction, target,
                              caption or None, edited_caption or None))
    return items


def read_edit_folder(edits: str | Path) -> list[EvalItem]:
    """One item per `<edits>/<name>/meta.json` written by `insvie-jax edit`."""
    folder = Path(edits)
    metas = sorted(folder.glob("*/meta.json"))
    if not metas:
        raise FileNotFoundError(f"no edits in {folder}: expected <name>/edit.mp4 + meta.json folders written by "
                                "`insvie-jax edit --out`")
    items = []
    for meta_file in metas:
        meta = json.loads(meta_file.read_text())
        items.append(EvalItem(meta_file.parent.name, meta["video"], str(meta_file.parent / "edit.mp4"),
                              meta["instruction"]))
    return items


def read_video(path: str, max_frames: int) -> np.ndarray:
    """uint8 (F, H, W, 3): the first `max_frames` frames of a video (an image is one frame)."""
    info = probe(path)
    return read_frames(path, np.arange(min(info.num_frames, max_frames)))


def align(edit: np.ndarray, *others: np.ndarray | None) -> list[np.ndarray | None]:
    """[edit, *others], each resized and centre-cropped to the edit's size as the edit command did, and cut to
    the frames they all have."""
    h, w = edit.shape[1:3]
    fitted = [None if o is None else (o if o.shape[1:3] == (h, w) else np.stack([resize_crop(f, h, w) for f in o]))
              for o in others]
    frames = min(len(v) for v in [edit, *fitted] if v is not None)
    return [None if v is None else v[:frames] for v in [edit, *fitted]]


def load(item: EvalItem, max_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(source, edit, target or None) of an item, aligned. Raises `VideoError` (with `.reason`) or
    FileNotFoundError."""
    edit = read_video(item.edit, max_frames)
    source = read_video(item.source, max_frames)
    target = read_video(item.target, max_frames) if item.target else None
    edit, source, target = align(edit, source, target)
    return source, edit, target
