"""adaptrep: fine-tuning-based meta-learning of representations (Chua, Lei & Lee, NeurIPS 2021)."""

from .environments import Environment, LinearEnvironment, LinearHardEnvironment, LogisticEnvironment, SinusoidEnvironment, Tasks, make_environment
from .finetune import FineTune, fit_head
from .methods import METHODS, AdaptRep, FrozenRep, MetaLearner, Method, Oracle, TargetOnly, make_method
from .models import Model, linear_model, relu_model

__version__ = "0.1.0"

__all__ = [
    "Environment",
    "LinearEnvironment",
    "LinearHardEnvironment",
    "LogisticEnvironment",
    "SinusoidEnvironment",
    "Tasks",
    "make_environment",
    "FineTune",
    "fit_head",
    "Method",
    "AdaptRep",
    "FrozenRep",
    "Oracle",
    "TargetOnly",
    "MetaLearner",
    "METHODS",
    "make_method",
    "Model",
    "linear_model",
    "relu_model",
]
