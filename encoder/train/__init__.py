"""Training of the Fundus2Video generator (imports the library; the library never imports this)."""

from .embed import CaseLabels, embed_training_loop
from .loop import TrainingSummary, schedule, scheduled_sampling_prob, training_loop
from .step import Batch, LossWeights, Nets, StepOptions, WindowSampler, make_optimizers, train_step

__all__ = [
    "Batch",
    "CaseLabels",
    "LossWeights",
    "Nets",
    "StepOptions",
    "TrainingSummary",
    "WindowSampler",
    "embed_training_loop",
    "make_optimizers",
    "schedule",
    "scheduled_sampling_prob",
    "train_step",
    "training_loop",
]
