"""The configuration schema's shared parts: every option defined once, as a pydantic field.

A field's type, bounds, default and description are the option's one definition: the configs
(:class:`~adaptrep.experiment.RunConfig`, :class:`~adaptrep.evaluate.EvaluateConfig`) are made of
these groups, config files use the field names as keys, and ``adaptrep run`` / ``adaptrep evaluate``
generate their flags and help from the fields (``--inner-lr`` is the field ``inner_lr``).

* :class:`MetaOptions`: the meta-learners' options (``None``: not given, so the learner's default
  for the source tasks applies, :func:`adaptrep.methods.meta_defaults`), with the keyword of
  :class:`~adaptrep.methods.MetaLearner` and :class:`~adaptrep.meta.MetaConfig` that each one sets.
  This is their one definition: a ``MetaLearner`` holds a ``MetaOptions`` (its keywords are validated
  here) and a ``MetaConfig`` validates its values here.
* :class:`Compute`: the device and the floating-point type.

Fields marked :data:`EXECUTION` say how a run is computed, not what is computed (the device,
compilation, chunking: they change the numbers at most by rounding), so they are left out of a run's
identity (:func:`identity`; see the sweeps page). Nothing here probes the machine: whether a device
exists here is checked by :func:`adaptrep.experiment.preflight` before a command runs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["EXECUTION", "MetaOptions", "Compute", "execution_keys", "identity", "device_name"]

#: Marks a field as an execution option (``Field(json_schema_extra=EXECUTION)``).
EXECUTION: dict[str, Any] = {"execution": True}


def _extra(field: Any) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def execution_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The execution options among ``model``'s fields (marked with :data:`EXECUTION`)."""
    return tuple(name for name, info in model.model_fields.items() if _extra(info).get("execution"))


def identity(config: BaseModel) -> dict[str, Any]:
    """What decides a run's numbers: the config without its seed count and its execution options.
    Runs are hashed and stored by it, so a folder resumed on another device or with other workers
    keeps its finished runs."""
    return config.model_dump(exclude={"seeds", *execution_keys(type(config))})


def device_name(value: str) -> str:
    """A torch device of a kind that computes here (cpu, cuda, mps); whether this machine has it is
    checked by :func:`adaptrep.experiment.preflight`, not here."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"not a torch device: {value!r}") from error
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {value!r}: only cpu, cuda and mps devices compute here")
    return value


def _keyword(name: str, **extra: Any) -> dict[str, Any]:
    """``json_schema_extra`` of a meta option whose :class:`~adaptrep.methods.MetaLearner` keyword is ``name``."""
    return {"keyword": name, **extra}


class MetaOptions(BaseModel):
    """The meta-learners' options (``maml``, ``fomaml``, ``anil``, ``reptile``, ``pooled``; ``target-only``
    on ``sinusoid`` takes ``inner_lr`` and ``adapt_steps``). ``None`` is "not given": the learner's
    default for its source tasks applies (:meth:`adaptrep.methods.MetaLearner.resolve`, which applies
    :func:`adaptrep.methods.meta_defaults`). A field's ``keyword`` (where it differs from its name)
    is its name in the Python API (``MetaLearner(iterations=...)``, ``MetaConfig(iterations=...)``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inner_steps: int | None = Field(None, ge=0, description="meta-learners: inner-loop gradient steps K (default 5)")
    inner_lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="meta-learners: inner step size alpha (default 0.1 / (curvature x largest input variance of the source tasks); sinusoid 0.01)",
    )
    outer_lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="meta-learners: outer step size (default 0.01; sinusoid 0.001)")
    meta_batch: int | None = Field(None, gt=0, description="meta-learners: tasks per meta-batch, at most the source tasks (default 25)")
    meta_iterations: int | None = Field(
        None, ge=0, description="meta-learners: outer iterations (default 1000; sinusoid 1500)", json_schema_extra=_keyword("iterations")
    )
    outer_optimizer: Literal["adam", "sgd"] = Field("adam", description="meta-learners: the outer optimiser", json_schema_extra=_keyword("optimizer"))
    support: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="maml/fomaml/anil: support share of each task's samples, a fraction in (0, 1) or a count (default: all samples are support and query)",
    )
    compile: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "torch.compile each step: the meta-learners' meta-step, and the generic source training and "
            "fine-tuning of adaptrep, frozenrep, oracle and pretrain (auto: for long runs only)"
        ),
        json_schema_extra=_keyword("compile", **EXECUTION),
    )
    meta_chunk: int | None = Field(
        None,
        gt=0,
        description="meta-learners: tasks per chunk of a meta-batch, for less memory (default: the whole meta-batch at once)",
        json_schema_extra=_keyword("chunk", **EXECUTION),
    )
    adapt_steps: int | None = Field(None, ge=0, description="meta-learners, target-only on sinusoid: inner-loop steps on the target (default: inner steps)")

    @field_validator("support")
    @classmethod
    def _support(cls, value: float | None) -> float | None:
        if value is not None and not (value < 1 or float(value).is_integer()):
            raise ValueError(f"must be a fraction in (0, 1) or an integer count; got {value}")
        return value

    @classmethod
    def keywords(cls) -> dict[str, str]:
        """Each option's keyword of :class:`~adaptrep.methods.MetaLearner` (and :func:`~adaptrep.methods.meta_defaults`)."""
        return {name: _extra(info).get("keyword", name) for name, info in MetaOptions.model_fields.items()}

    @classmethod
    def from_keywords(cls, **keywords: Any) -> MetaOptions:
        """The options given by their keywords (``iterations=...``, ``chunk=...``); a one-line
        ``ValueError`` naming an unknown keyword or a value out of bounds."""
        names = {keyword: name for name, keyword in cls.keywords().items()}
        unknown = [keyword for keyword in keywords if keyword not in names]
        if unknown:
            raise ValueError(f"unknown meta-learner option {unknown[0]!r}; the options are {', '.join(names)}")
        try:
            return MetaOptions(**{names[keyword]: value for keyword, value in keywords.items()})
        except ValidationError as error:
            first = error.errors()[0]
            keyword = cls.keywords().get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else "options"
            raise ValueError(f"{keyword}: {str(first['msg']).removeprefix('Value error, ')}; got {first.get('input')!r}") from None

    def meta_options(self) -> MetaOptions:
        """These options alone (from a config that has other fields too)."""
        return MetaOptions(**{name: getattr(self, name) for name in MetaOptions.model_fields})

    def learner_options(self) -> dict[str, Any]:
        """The options as keywords of :func:`adaptrep.methods.make_method` (``None``: the learner's default)."""
        return {keyword: getattr(self, name) for name, keyword in self.keywords().items()}

    def target_steps(self, default: int | None = None) -> int | None:
        """The inner-loop steps on a target: ``adapt_steps``, else ``inner_steps``, else ``default``
        (the one place that says ``adapt_steps`` defaults to the inner steps)."""
        if self.adapt_steps is not None:
            return self.adapt_steps
        return self.inner_steps if self.inner_steps is not None else default


class Compute(BaseModel):
    """Where and in which precision a run computes. The device is an execution option; the dtype is
    not (float32 changes the numbers beyond rounding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("cpu", description="torch device, e.g. cpu or cuda (default cpu)", json_schema_extra=EXECUTION)
    dtype: Literal["float32", "float64"] = Field("float64", description="floating-point type")

    _device = field_validator("device")(device_name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32
