"""Data: vocabulary, COCO readers, the shard schema, transforms and the streaming data module.

Names are imported lazily so that ``openseed.data.vocab`` (used by the model) does not pull in Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "Vocabulary": "openseed.data.vocab",
    "clean_class_name": "openseed.data.vocab",
    "DataError": "openseed.data.coco",
    "ShardSet": "openseed.data.shards",
    "Sample": "openseed.data.shards",
    "read_shards": "openseed.data.shards",
    "LargeScaleJitter": "openseed.data.transforms",
    "EvalResize": "openseed.data.transforms",
    "collate": "openseed.data.transforms",
    "OpenSeeDDataModule": "openseed.data.datamodule",
    "DataSource": "openseed.data.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'openseed.data' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
