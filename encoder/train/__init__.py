"""Training of the Fundus2Video generator (imports the library; the library never imports this)."""

from .embed import CaseLabels, EmbedderTrainOptions, embed_training_loop
from .loop import GeneratorTrainOptions, scheduled_sampling_prob, training_loop
from .session import TrainingSession, TrainingSummary, TrainOptions, schedule
from .step import Batch, LossWeights, Nets, StepOptions, WindowSampler, make_optimizers, train_step

__all__ = [
    "Batch",
    "CaseLabels",
    "EmbedderTrainOptions",
    "GeneratorTrainOptions",
    "LossWeights",
    "Nets",
    "StepOptions",
    "TrainOptions",
    "TrainingSession",
    "TrainingSummary",
    "WindowSampler",
    "embed_training_loop",
    "make_optimizers",
    "schedule",
    "scheduled_sampling_prob",
    "train_step",
    "training_loop",
]
