"""Saved models: a fitted method in one file, loaded without the training data.

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: the learned tensors
(representation, meta-learned parameters, the feature scaling) as named tensors, and in its
metadata one JSON document with the method's class and hyperparameters, what it resolved at ``fit``
(model kind, intercept, input shape, feature names, loss, classes), its scalars and the library
version. Nothing is pickled. A user's ``torch.nn.Module`` is not stored as code: pass the same
module class again to :func:`load_method` (its parameter names and shapes are checked). A
meta-learner's algorithm object is stored by its fields (loaded as the registered one of that name if
they agree, else as a plain :class:`~adaptrep.meta.Algorithm` that adapts as it did but cannot be fitted
again); its outer optimiser, which a fitted model no longer uses, by its fields (``adam``, ``sgd``) or
its ``repr`` (your own, loaded as a stand-in that refuses to fit).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import DataError, Standardizer
from .finetune import FineTune
from .meta import ALGORITHMS, SGD, Adam, Algorithm, MetaConfig, Transform
from .methods import METHOD_CLASSES, Method, Spec, with_intercept
from .models import Model, model_for
from .options import MetaOptions

__all__ = ["save_method", "load_method", "FORMAT"]

#: The ``format`` entry of a saved model's metadata.
FORMAT = "adaptrep-model/1"


class SavedTransform:
    """The stand-in for a user's outer optimiser in a loaded model (it was not saved as code)."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __repr__(self) -> str:
        return self.description

    def init(self, params: Any) -> Any:
        raise ValueError(f"this meta-learner was loaded from a file without its outer optimiser {self.description}: pass optimizer=... to fit it again")

    def update(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        return self.init(params)


def _encode(value: Any) -> Any:
    """A meta-learning algorithm, outer optimiser or meta-learner options object as JSON (its class and fields, or its repr)."""
    if isinstance(value, Algorithm) or isinstance(value, (Adam, SGD)):
        return {"object": type(value).__name__, **dataclasses.asdict(value)}
    if not isinstance(value, str) and isinstance(value, Transform):
        return {"object": type(value).__name__, "repr": repr(value)}
    if isinstance(value, MetaOptions):
        return {"object": "MetaOptions", **value.model_dump()}
    return value


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode` (see the module docstring for what comes back)."""
    if not (isinstance(value, dict) and "object" in value):
        return value
    fields = {key: item for key, item in value.items() if key != "object"}
    if value["object"] == "MetaOptions":
        return MetaOptions(**fields)
    if value["object"] in ("Adam", "SGD"):
        return Adam(fields["lr"], tuple(fields["betas"]), fields["eps"]) if value["object"] == "Adam" else SGD(**fields)
    if "repr" in fields:
        return SavedTransform(fields["repr"])
    registered = ALGORITHMS.get(fields["name"])
    if registered is not None and all(getattr(registered, key) == item for key, item in fields.items()):
        return registered
    return Algorithm(**{f.name: fields[f.name] for f in dataclasses.fields(Algorithm)})


def _options(method: Method) -> dict[str, Any]:
    """The method's hyperparameters as JSON values (a module is recorded by its class name)."""
    options: dict[str, Any] = {}
    for f in dataclasses.fields(method):  # type: ignore[arg-type]
        value = getattr(method, f.name)
        if isinstance(value, torch.nn.Module):
            value = {"module": type(value).__qualname__}
        elif isinstance(value, FineTune):
            value = {"finetune": dataclasses.asdict(value)}
        options[f.name] = _encode(value)
    return options


def save_method(method: Method, path: str | Path, data: dict[str, Any] | None = None) -> Path:
    """Write a fitted method to ``path`` (written to a temporary file, then renamed: an existing
    file is never left half-written); ``data`` records how its training data were read (columns)."""
    from safetensors.torch import save_file

    from . import __version__

    if not hasattr(method, "spec"):
        raise ValueError(f"{type(method).__name__} is not fitted: call fit before saving")
    spec = method.spec
    tensors: dict[str, Tensor] = {}
    if method.representation is not None:
        tensors["representation"] = method.representation
    for name, value in (getattr(method, "theta", None) or {}).items():
        tensors[f"theta.{name}"] = value
    if getattr(method, "w", None) is not None:
        tensors["w"] = method.w  # type: ignore[attr-defined]
    for name, value in (spec.theta0 or {}).items():
        tensors[f"theta0.{name}"] = value
    if method.head_prior is not None:
        tensors["prior.mean"], tensors["prior.cov"] = method.head_prior
    if spec.standardizer is not None:
        tensors["scale.mean"], tensors["scale.scale"] = spec.standardizer.mean, spec.standardizer.scale
    config = getattr(method, "config", None)
    meta = {
        "format": FORMAT,
        "adaptrep": __version__,
        "method": type(method).__name__,
        "options": _options(method),
        "spec": {
            "kind": spec.kind,
            "key": spec.key,
            "loss": spec.model.loss,
            "intercept": spec.intercept,
            "input_shape": list(spec.input_shape),
            "feature_names": list(spec.feature_names) if spec.feature_names is not None else None,
            "classes": spec.classes,
            "prior": spec.prior,
        },
        "state": {
            "noise_estimate": method.noise_estimate,
            "noise_dof": method.noise_dof,
            "perturbation_variance": method.perturbation_variance,
            "width": getattr(method, "width", None),
            "labels": [spec.standardizer.label_mean, spec.standardizer.label_scale] if spec.standardizer is not None else None,
            "config": {f.name: _encode(getattr(config, f.name)) for f in dataclasses.fields(config)} if isinstance(config, MetaConfig) else None,
        },
        "data": data or {},
        "info": {key: value for key, value in method.info.items() if isinstance(value, (int, float, str, bool))},
    }
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(temporary), metadata={"adaptrep": json.dumps(meta)})
    temporary.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved model; :class:`~adaptrep.data.DataError` (one line) for a file that
    is missing, unreadable or not an adaptrep model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - any failure means the file is not ours
        raise DataError(f"{path} is not an adaptrep model file ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    try:
        meta = json.loads(metadata["adaptrep"])
    except (KeyError, ValueError):
        raise DataError(f"{path} is a safetensors file but not an adaptrep model") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: unsupported model format {meta.get('format')!r}; this adaptrep reads {FORMAT}")
    return meta


def load_method(path: str | Path, module: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> Method:
    """A fitted method from ``path``, with its tensors on ``device``. A model fitted with a user's
    ``torch.nn.Module`` needs ``module`` (an instance of the same class: its parameter names and
    shapes must match the saved ones)."""
    from safetensors.torch import load_file

    from . import __version__

    meta = read_metadata(path)
    major = lambda version: str(version).split(".")[:2]  # noqa: E731
    if major(meta["adaptrep"]) != major(__version__):
        raise DataError(f"{path} was saved by adaptrep {meta['adaptrep']}; this is {__version__} (numerics differ between minor versions): fit it again")
    tensors = {name: value.to(device) for name, value in load_file(str(path)).items()}
    cls = METHOD_CLASSES.get(meta["method"])
    if cls is None:
        raise DataError(f"{path}: unknown method class {meta['method']!r}")
    spec_meta, state = meta["spec"], meta["state"]
    options = {key: _decode(value) for key, value in meta["options"].items()}
    theta0 = {name.removeprefix("theta0."): value for name, value in tensors.items() if name.startswith("theta0.")}
    if spec_meta["kind"] == "module":
        if module is None:
            raise DataError(f"{path} holds a model fitted with your own torch.nn.Module ({options['model']['module']}): pass an instance of it to load it")
        saved = {name: tuple(value.shape) for name, value in theta0.items()}
        own = {name: tuple(p.shape) for name, p in module.named_parameters()}
        if saved != own:
            raise DataError(f"{path}: the module's parameters {own} do not match the saved ones {saved}")
        options["model"] = module
    if isinstance(options.get("finetune"), dict):
        options["finetune"] = FineTune(**options["finetune"]["finetune"])
    method = cls(**options)
    loss = spec_meta["loss"]
    count = spec_meta["classes"] if loss == "multiclass" else None
    if spec_meta["kind"] == "module":
        model: Model = Model.from_module(module, loss, count)[0]  # type: ignore[arg-type]
    else:
        model = model_for(loss, spec_meta["kind"], count)[0]
    if spec_meta["intercept"] and spec_meta["kind"] != "mlp" and not (spec_meta["kind"] == "linear" and loss == "squared" and cls.exact_path):
        model = with_intercept(model)
    labels = state.get("labels") or (0.0, 1.0)
    scaler = Standardizer(tensors["scale.mean"], tensors["scale.scale"], *labels) if "scale.mean" in tensors else None
    names = tuple(spec_meta["feature_names"]) if spec_meta["feature_names"] is not None else None
    method.spec = Spec(
        model, spec_meta["key"], spec_meta["kind"], theta0 or None, spec_meta["intercept"], scaler, tuple(spec_meta["input_shape"]), names, spec_meta["classes"]
    )
    method.spec.prior = bool(spec_meta.get("prior", False))
    if "prior.mean" in tensors:
        method.head_prior = (tensors["prior.mean"], tensors["prior.cov"])
    method.representation = tensors.get("representation")
    theta = {name.removeprefix("theta."): value for name, value in tensors.items() if name.startswith("theta.")}
    if theta:
        method.theta = theta  # type: ignore[attr-defined]
    if "w" in tensors:
        method.w = tensors["w"]  # type: ignore[attr-defined]
    method.noise_estimate, method.noise_dof = state["noise_estimate"], state["noise_dof"]
    method.perturbation_variance = state.get("perturbation_variance")
    if state.get("width") is not None:
        method.width = state["width"]  # type: ignore[attr-defined]
    if state.get("config") is not None:
        method.config = MetaConfig(**{key: _decode(value) for key, value in state["config"].items()})  # type: ignore[attr-defined]
    method.info = dict(meta.get("info", {}))
    return method
