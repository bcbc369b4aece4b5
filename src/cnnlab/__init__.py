"""cnnlab: train small classifiers from Hydra configs and see why they train well or badly."""

__version__ = "0.1.0"
