"""adaptrep: fine-tuning-based meta-learning of representations (Chua, Lei & Lee, NeurIPS 2021)."""

from .adapted import Adapted
from .data import DataError, Standardizer, Tasks, read_tasks, split_shots, split_tasks
from .environments import Environment, LinearEnvironment, LinearHardEnvironment, LogisticEnvironment, SinusoidEnvironment, make_environment
from .finetune import FineTune, fit_head
from .methods import METHODS, AdaptRep, FrozenRep, MetaLearner, Method, Oracle, TargetOnly, make_method
from .models import Model, linear_model, relu_model
from .saving import load_method, save_method

__version__ = "0.5.2"

__all__ = [
    "Adapted",
    "DataError",
    "Standardizer",
    "read_tasks",
    "split_shots",
    "split_tasks",
    "load_method",
    "save_method",
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
