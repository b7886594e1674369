"""What a run prints: plain progress lines when the output is a file, and none of the library messages that say
nothing to act on (the lines seen before the fix are the probes)."""

import io
import logging
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from openseed.console import LineProgressBar, progress_bar, quiet_known_noise


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_line_progress_bar_prints_plain_lines(tmp_path):
    stream = io.StringIO()
    trainer = L.Trainer(max_epochs=2, callbacks=[LineProgressBar(every_n_seconds=1e-9, stream=stream)],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.ones(6, 2)), batch_size=2))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and "\r" not in stream.getvalue()  # one line per step here (every_n_seconds ~ 0)
    assert lines[0].startswith("epoch 1/2 | step 1/3 (33%) | ") and "it/s | eta " in lines[0]
    assert lines[-1].startswith("epoch 2/2 | step 3/3 (100%)") and "train/loss " in lines[-1]


def test_progress_display_follows_the_output():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_bar(30, stream=io.StringIO()), LineProgressBar)
    assert not isinstance(progress_bar(30, stream=Terminal()), LineProgressBar)


def test_known_noise_is_dropped_and_other_messages_kept(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        for message, category in [
            ("Found 118 module(s) in eval mode at the start of training. This may lead to ...", UserWarning),
            ("You have overridden `transfer_batch_to_device` in `LightningModule` but ...", UserWarning),
            ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning),
            ("Checkpoint directory x exists and is not empty.", UserWarning)]:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == ["Checkpoint directory x exists and is not empty."]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        logger.propagate = True
        logger.info("💡 Tip: For seamless cloud logging ... install litlogger")
        logger.info("GPU available: False, used: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_wandb_logger_passes_no_deprecated_setting(tmp_path):
    from openseed.training.loggers import WandbLogger

    logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"


def test_text_tower_loads_without_a_load_report(capfd):
    from openseed.modeling.text_encoder import build_text_tower

    build_text_tower("minilm")
    out, err = capfd.readouterr()
    assert "UNEXPECTED" not in out + err and "Loading weights" not in out + err
