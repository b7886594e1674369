"""Data: COCO readers, the shard schema, transforms and the streaming data module.

Names are imported lazily: reading shards (evaluation, tools) does not pull in Lightning with the data module.
"""

from importlib import import_module

_EXPORTS = {
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
