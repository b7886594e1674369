"""Logger classes the configs name (conf/logger)."""

from __future__ import annotations

import inspect

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger without the ``anonymous`` argument it always hands to ``wandb.init`` (W&B deprecated
    the setting and warns on every run, whatever its value); everything else is Lightning's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


# the config check (openseed.config) reads Lightning's parameters and their types
WandbLogger.__signature__ = inspect.signature(_LightningWandbLogger)
