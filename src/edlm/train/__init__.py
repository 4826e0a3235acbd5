"""Training: conversion, noise, the objective, data and the accelerate loop.

config (TrainConfig, every default once) -> data, noise -> objective -> convert ->
settings (the flags and the checkpoint reconciled once, frozen) -> loop.
"""

from edlm.train.config import TrainConfig
from edlm.train.loop import train

__all__ = ["TrainConfig", "train"]
