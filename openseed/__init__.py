"""openseed: open-vocabulary segmentation and detection (OpenSeeD) as a research platform."""

__version__ = "0.1.0"
