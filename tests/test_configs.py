"""The data configs compose and build the data module they name, with every key a real argument."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from openseed.data.datamodule import OpenSeeDDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_configs_instantiate(name, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENSEED_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+data={name}", "+paths=default"])
    module = instantiate(cfg.data)
    assert isinstance(module, OpenSeeDDataModule)
    assert module.seg.path.startswith(str(tmp_path)) and module.seg.batch_size >= 1
    with pytest.raises(FileNotFoundError, match="not found"):  # nothing converted there yet: a clear message
        module.setup()


def test_unknown_key_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENSEED_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+data=synthshapes", "+paths=default", "+data.image_sise=3"])
    with pytest.raises(Exception, match="image_sise"):
        instantiate(cfg.data)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_model_configs_build(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", "+model.decoupled=false"])
    model = instantiate(cfg.model)
    assert model.config.decoupled is False and model.decoder.num_bg == 0


@pytest.mark.parametrize("name", ["swint_nodecouple", "swint_decouple", "swinl_decouple"])
def test_full_size_model_configs_name_the_released_architectures(name):
    from openseed.modeling.openseed import MODEL_SIZES

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}"])
    config = MODEL_SIZES[cfg.model.size]
    assert cfg.model.size == name and cfg.model.init_from is None
    assert config.num_fg == 300 and config.decoder_layers == 9 and config.num_bg == (0 if "nodecouple" in name else 100)
    assert config.text_tower == "clip_transformer" and config.text_context == (77 if name == "swint_decouple" else 18)
    assert not config.mask_padding and config.level_order == "coarse_first" and not config.class_bias


@pytest.mark.parametrize("name", ["tiny", "small", "swint_nodecouple", "swint_decouple", "swinl_decouple"])
def test_model_configs_show_their_presets_sizes(name):
    """conf/model/<size>.yaml lists the architecture's sizes, each equal to the preset's (MODEL_SIZES), so reading
    the file tells what is built and building from it builds the preset."""
    from dataclasses import fields

    from openseed.modeling.openseed import MODEL_SIZES

    listed = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    preset = MODEL_SIZES[name]
    sizes = {k: v for k, v in listed.items() if k not in ("_target_", "_convert_", "size", "init_from")}
    for required in ("backbone", "hidden_dim", "encoder_layers", "decoder_layers", "num_fg", "num_bg", "text_tower"):
        assert required in sizes
    known = {f.name for f in fields(preset)}
    for key, value in sizes.items():
        assert key in known
        assert (tuple(value) if isinstance(value, list) else value) == getattr(preset, key), key
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}"])
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if not k.startswith("_")}
    size = kwargs.pop("size")
    kwargs.pop("init_from")
    from dataclasses import replace

    assert replace(MODEL_SIZES[size], **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}) \
        == preset


def test_converted_model_config_requires_the_file():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+model=converted"])
    with pytest.raises(Exception, match="init_from"):
        instantiate(cfg.model)


def test_model_overrides_are_recorded_as_plain_values(tmp_path):
    """Hydra hands lists and dicts over as OmegaConf containers unless converted: the recorded config must be plain
    Python, or model files and checkpoints would not load with weights_only."""
    from openseed.modeling.checkpoint import save_model
    from openseed.modeling.openseed import load_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+model=tiny", "model.encoder_features=[res3,res4,res5]",
                                 "+model.backbone_options={}"])
    model = instantiate(cfg.model)
    assert type(model.config.encoder_features) is tuple and type(model.config.backbone_options) is dict
    save_model(model, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt").config.encoder_features == ("res3", "res4", "res5")
