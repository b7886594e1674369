"""openseed: open-vocabulary segmentation and detection (OpenSeeD) as a research platform."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Predictor":  # imported lazily: ``import openseed`` stays cheap
        from openseed.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'openseed' has no attribute {name!r}")
