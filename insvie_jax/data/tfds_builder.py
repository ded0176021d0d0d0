"""A TFDS builder over the same triplet lists, stored as ArrayRecord: `tfds.data_source(...)` then serves
InsViE-1M video triplets and image pairs (1-frame samples) alike, with random access and no TensorFlow.

    builder = InsvieEdit(lists=["train.csv"], data_cfg=cfg.data, data_dir="tfds/")
    builder.download_and_prepare()
    source = tfds.data_source("insvie_edit", data_dir="tfds/")["train"]   # source[i]["source"], ...

Each example holds the sampled, cropped uint8 frames of source and edit (centre crop: the random crop is a
training-time choice), the instruction and the sample name. Bad samples are skipped and named in
`<data_dir>/insvie_edit/<version>/bad_samples.json`, never fatal.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from insvie_jax.data import sources


class InsvieEdit(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Triplets (source frames, edited frames, instruction) from InsViE-style lists."}

    def __init__(self, *, lists=(), data_cfg=None, **kwargs):
        self._lists = [str(p) for p in lists]
        self._data_cfg = data_cfg
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        frames = tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.ZLIB)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "source": frames, "target": frames, "instruction": tfds.features.Text(),
                "name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        if not self._lists or self._data_cfg is None:
            raise ValueError("InsvieEdit needs lists=[...] (triplet CSV/JSONL files) and data_cfg (config.data) to "
                             "prepare; reading a prepared dataset needs neither")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        triplets, report = sources.read_lists(self._lists, self._data_cfg.video_roots,
                                              self._data_cfg.allow_outside_root)
        for triplet in triplets:
            clip = sources.try_load_clip(triplet, self._data_cfg, report, seed=None)
            if clip is not None:
                yield triplet.name, {"source": clip.source, "target": clip.target,
                                     "instruction": triplet.instruction, "name": triplet.name}
        # During preparation `data_dir` is TFDS's incomplete folder, renamed to the version folder at the end.
        (epath.Path(self.data_dir) / "bad_samples.json").write_text(json.dumps(report.to_dict(), indent=1))
