"""Config as data: typed dataclasses (schema.py), YAML files with `base:` includes and `key=value` overrides
(load.py), checks of derived values (validate.py), curriculum stages (stages.py).

Every key is validated when the config is loaded: an unknown key names the closest valid one, a value of the
wrong type or out of its range names the key and what it wants, and derived values (frame counts, resolution,
dtype) are checked once here so that nothing downstream has to.
"""

from insvie_jax.config.load import (
    CONFIG_DIR,
    choices,
    from_dict,
    load,
    parse_override,
    presets,
    resolve_path,
    save,
    section_classes,
)
from insvie_jax.config.schema import (
    FAMILY_SECTIONS,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DDPMSampler,
    DiffusionConfig,
    FilterConfig,
    FlowSampler,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    ModelFamily,
    Range,
    SampleConfig,
    TextEncoderConfig,
    TrainConfig,
    VAEConfig,
    WanModelConfig,
    WanVAEConfig,
    _field_types,
    latent_shape,
    ranged,
)
from insvie_jax.config.stages import STAGE_KEYS, Stage, resolve_stages, what_trains
from insvie_jax.config.validate import validate

__all__ = [
    "CONFIG_DIR", "FAMILY_SECTIONS", "STAGE_KEYS", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "CheckpointConfig",
    "Config", "ConfigError", "DDPMSampler", "DataConfig", "DiffusionConfig", "FilterConfig", "FlowSampler",
    "LoraConfig", "MeshConfig", "ModelConfig", "ModelFamily", "Range", "SampleConfig", "Stage", "TextEncoderConfig",
    "TrainConfig", "VAEConfig", "WanModelConfig", "WanVAEConfig", "_field_types", "choices", "from_dict",
    "latent_shape", "load", "parse_override", "presets", "ranged", "resolve_path", "resolve_stages", "save",
    "section_classes", "validate", "what_trains",
]
