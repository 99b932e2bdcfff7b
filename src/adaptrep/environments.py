"""Task environments whose ground truth is known, as in our standard environments.

Every environment here is *linear with Gaussian inputs and diagonal covariance*: a task is a
parameter vector ``beta_t`` in R^d, its data are ``x ~ N(0, Sigma)`` and
``y = <x, beta_t> + sigma * xi``. The excess risk of an estimate ``beta_hat`` is then exact,
``(beta_hat - beta_t)^T Sigma (beta_hat - beta_t)``, never a Monte Carlo estimate.

* :class:`LinearEnvironment` (``linear``): the benign, approximately shared environment,
  ``beta_t = (B* + Delta_t) w_t`` with ``B*`` the first ``k`` columns of a Haar-random
  orthogonal matrix, ``w_t ~ N(0, I_k)`` and ``||Delta_t||_F = delta`` exactly.
* :class:`LinearHardEnvironment` (``linear-hard``): the paper's hard case (its appendix C.3
  simulation), where a representation trained with no regard for fine-tuning keeps the wrong
  block of coordinates.

* :class:`SinusoidEnvironment` (``sinusoid``): the MAML paper's sinusoid regression (nonlinear,
  no true representation; its excess risk is a mean over a dense grid), for the meta-learners.

All sampling is done on the CPU with an explicit :class:`torch.Generator` in float64 and then
moved to the environment's device and dtype, so a seed gives the same tasks on every device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import Tasks
from .logistic import logistic_excess_error01, logistic_excess_risk
from .models import MLP_WIDTHS, mlp_model, unflatten_mlp

__all__ = [
    "Tasks",
    "Environment",
    "LinearEnvironment",
    "LinearHardEnvironment",
    "LogisticEnvironment",
    "ReluNetEnvironment",
    "ReluHardEnvironment",
    "SinusoidEnvironment",
    "make_environment",
    "SETTINGS",
]


def haar_orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal ``dim x dim`` matrix (float64, CPU)."""
    Z = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(Z)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def unit_vectors(num: int, dim: int, generator: torch.Generator) -> Tensor:
    """``num`` independent uniform unit vectors in R^dim (float64, CPU)."""
    z = torch.randn(num, dim, generator=generator, dtype=torch.float64)
    return z / z.norm(dim=-1, keepdim=True)


def _check_delta(delta: float) -> float:
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite non-negative number; got {delta}")
    return float(delta)


def perturbed_representations(representation: Tensor, delta: float, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Task representations ``B* + Delta_t`` (``(T, d, k)``) and heads ``w_t ~ N(0, I_k)`` (``(T, k)``),
    with ``Delta_t = delta G_t / ||G_t||_F`` for i.i.d. standard normal ``G_t`` (float64, CPU)."""
    d, k = representation.shape
    w = torch.randn(num_tasks, k, generator=generator, dtype=torch.float64)
    G = torch.randn(num_tasks, d, k, generator=generator, dtype=torch.float64)
    return representation + delta * G / G.flatten(1).norm(dim=1)[:, None, None], w


class Environment:
    """Base class: a linear-Gaussian task environment with diagonal input covariance.

    Subclasses set ``input_scale`` (the square roots of the diagonal of ``Sigma``, float64 CPU),
    ``representation`` (``B*``) and implement :meth:`sample_parameters`.
    """

    name: str = ""
    loss: str = "squared"
    model: str = "linear"
    input_scale: Tensor
    _representation: Tensor

    def __init__(self, dim: int, rank: int, noise: float, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> None:
        if dim <= 0 or rank <= 0:
            raise ValueError(f"dim and rank must be positive; got dim={dim}, rank={rank}")
        if rank > dim:
            raise ValueError(f"rank ({rank}) must not exceed dim ({dim})")
        if not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite non-negative number; got {noise}")
        self.dim, self.rank, self.noise = dim, rank, float(noise)
        self.device, self.dtype = torch.device(device), dtype

    # -- ground truth -------------------------------------------------------------------------
    @property
    def representation(self) -> Tensor:
        """The true representation ``B*`` (``(d, k)``, orthonormal columns)."""
        return self._representation.to(self.device, self.dtype)

    @property
    def covariance_diagonal(self) -> Tensor:
        """The diagonal of the input covariance ``Sigma``."""
        return (self.input_scale**2).to(self.device, self.dtype)

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """Draw ``num_tasks`` task parameters ``beta_t`` (float64, CPU, shape ``(T, d)``)."""
        raise NotImplementedError

    # -- data ---------------------------------------------------------------------------------
    def sample_inputs(self, num_tasks: int, num_samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Standard normal draws ``(Z, xi)`` from which :meth:`make_tasks` builds data."""
        Z = torch.randn(num_tasks, num_samples, self.dim, generator=generator, dtype=torch.float64)
        xi = torch.randn(num_tasks, num_samples, generator=generator, dtype=torch.float64)
        return Z, xi

    def make_tasks(self, beta: Tensor, Z: Tensor, xi: Tensor) -> Tasks:
        """Tasks with parameters ``beta`` from standard normal draws: ``x = Sigma^{1/2} z``, ``y = <x, beta> + sigma xi``."""
        beta = beta.to("cpu", torch.float64)
        X = Z * self.input_scale
        device, dtype = self.device, self.dtype
        return Tasks(X.to(device, dtype), self._labels(X, beta, xi).to(device, dtype), beta.to(device, dtype), self.representation, self.loss, self.model)

    def _labels(self, X: Tensor, beta: Tensor, xi: Tensor) -> Tensor:
        return (X @ beta.unsqueeze(-1)).squeeze(-1) + self.noise * xi

    def sample_tasks(self, num_tasks: int, num_samples: int, generator: torch.Generator, beta: Tensor | None = None) -> Tasks:
        """Draw ``num_tasks`` tasks (new parameters unless ``beta`` is given) with ``num_samples`` samples each."""
        if num_tasks <= 0 or num_samples <= 0:
            raise ValueError(f"num_tasks and num_samples must be positive; got {num_tasks}, {num_samples}")
        if beta is None:
            beta = self.sample_parameters(num_tasks, generator)
        Z, xi = self.sample_inputs(num_tasks, num_samples, generator)
        return self.make_tasks(beta, Z, xi)

    # -- scoring ------------------------------------------------------------------------------
    def excess_risk(self, beta_hat: Tensor, beta: Tensor) -> Tensor:
        """Exact excess risk ``(beta_hat - beta)^T Sigma (beta_hat - beta)``, one value per task."""
        diff = beta_hat.to(self.device, self.dtype) - beta.to(self.device, self.dtype)
        return (diff * diff * self.covariance_diagonal).sum(-1)

    def metrics(self, beta_hat: Tensor, beta: Tensor) -> dict[str, Tensor]:
        """Further exact per-task scores beside :meth:`excess_risk` (none here)."""
        return {}

    def adversarial_parameters(self, representation: Tensor, num_tasks: int) -> Tensor:
        """Target parameters chosen against a learned representation (only ``linear-hard`` has them)."""
        raise NotImplementedError(f"the {self.name} environment has no adversarial targets")


class LinearEnvironment(Environment):
    """The benign environment ``linear``: ``beta_t = (B* + Delta_t) w_t``.

    ``B*`` is the first ``k`` columns of a Haar-random orthogonal matrix drawn from ``seed``;
    ``w_t ~ N(0, I_k)``; ``Delta_t = delta G_t / ||G_t||_F`` with ``G_t`` i.i.d. standard normal,
    so ``||Delta_t||_F = delta`` exactly; ``x ~ N(0, I_d)``.
    """

    name = "linear"

    def __init__(
        self, dim: int, rank: int, delta: float = 0.4, noise: float = 0.5, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__(dim, rank, noise, device, dtype)
        self.delta = _check_delta(delta)
        self.input_scale = torch.ones(dim, dtype=torch.float64)
        self._representation = haar_orthogonal(dim, torch.Generator().manual_seed(seed))[:, :rank]

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        W, w = perturbed_representations(self._representation, self.delta, num_tasks, generator)
        return (W @ w.unsqueeze(-1)).squeeze(-1)


class TwoBlocks:
    """The hard cases' inputs: variance ``eps`` on the first ``d - k`` coordinates (the *opt
    block* is the first ``k`` of them) and 1 on the last ``k`` (the *delta block*)."""

    dim: int
    rank: int
    dtype: torch.dtype
    device: torch.device
    name: str

    def _set_blocks(self, eps: float) -> None:
        if self.dim < 2 * self.rank:
            raise ValueError(f"{self.name} needs dim >= 2 * rank; got dim={self.dim}, rank={self.rank}")
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite positive number; got {eps}")
        self.eps = float(eps)
        scale = torch.ones(self.dim, dtype=torch.float64)
        scale[: self.dim - self.rank] = math.sqrt(eps)
        self.input_scale = scale
        self._representation = torch.eye(self.dim, dtype=torch.float64)[:, : self.rank]
        self.opt_scale = math.sqrt(1.0 / (2.0 * eps))

    @property
    def opt_block(self) -> Tensor:
        """Basis ``(d, k)`` of the opt block (the first k coordinates)."""
        return torch.eye(self.dim, dtype=self.dtype, device=self.device)[:, : self.rank]

    @property
    def delta_block(self) -> Tensor:
        """Basis ``(d, k)`` of the delta block (the last k coordinates)."""
        return torch.eye(self.dim, dtype=self.dtype, device=self.device)[:, self.dim - self.rank :]


class LinearHardEnvironment(TwoBlocks, Environment):
    """The paper's linear hard case ``linear-hard`` (its appendix C.3 simulation).

    Inputs have variance ``eps`` on the first ``d - k`` coordinates and 1 on the last ``k``.
    A task is ``theta_t = [sqrt(1/(2 eps)) u_t, 0, v_t]`` with ``u_t, v_t`` uniform unit vectors
    in R^k: the *opt block* (first k coordinates) has a large norm but low-variance inputs, the
    *delta block* (last k) a unit norm and unit-variance inputs. The representation that
    fine-tuning-aware training should find is the opt block, ``B* = [I_k; 0]``.
    """

    name = "linear-hard"

    def __init__(
        self, dim: int, rank: int, eps: float = 0.1, noise: float = 0.5, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__(dim, rank, noise, device, dtype)
        self._set_blocks(eps)

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        u = unit_vectors(num_tasks, self.rank, generator)
        v = unit_vectors(num_tasks, self.rank, generator)
        theta = torch.zeros(num_tasks, self.dim, dtype=torch.float64)
        theta[:, : self.rank] = self.opt_scale * u
        theta[:, self.dim - self.rank :] = v
        return theta

    def adversarial_parameters(self, representation: Tensor, num_tasks: int) -> Tensor:
        """The target that hides its signal where ``representation`` looks least.

        ``theta = sqrt(1/(2 eps)) a + b`` with ``a`` (``b``) the unit direction of the opt (delta)
        block least covered by the span of ``representation``, i.e. the eigenvector of the
        smallest eigenvalue of ``E^T P E`` for the block basis ``E`` and the orthogonal projector
        ``P`` onto the span. All ``num_tasks`` targets share this parameter (float64, CPU).
        """
        Q = torch.linalg.qr(representation.detach().to("cpu", torch.float64))[0]
        parts = []
        for block in (self.opt_block, self.delta_block):
            E = block.to("cpu", torch.float64)
            C = E.T @ Q
            _, vecs = torch.linalg.eigh(C @ C.T)
            direction = E @ vecs[:, 0]
            parts.append(direction * torch.sign(direction.sum() + 1e-300))
        theta = self.opt_scale * parts[0] + parts[1]
        return theta.expand(num_tasks, -1).clone()


class LogisticEnvironment(LinearEnvironment):
    """The benign environment ``logistic``: ``linear``'s ``B*``, ``Delta_t``, ``w_t`` and inputs,
    with labels ``y ~ Bernoulli(sigmoid(s <x, beta_t>))`` for a signal scale ``s``.

    ``beta`` of its tasks is the true logit vector ``s beta_t``. The excess risk is the excess
    logistic loss over the Bayes predictor, and :meth:`metrics` adds the excess 0-1 error, both
    exact (one-dimensional quadrature, :mod:`adaptrep.logistic`).
    """

    name = "logistic"
    loss = "logistic"

    def __init__(
        self, dim: int, rank: int, delta: float = 0.4, scale: float = 3.0, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__(dim, rank, delta=delta, noise=0.0, seed=seed, device=device, dtype=dtype)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive number; got {scale}")
        self.scale = float(scale)

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        return self.scale * super().sample_parameters(num_tasks, generator)

    def sample_inputs(self, num_tasks: int, num_samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Standard normal inputs and uniform draws that decide the labels."""
        Z = torch.randn(num_tasks, num_samples, self.dim, generator=generator, dtype=torch.float64)
        return Z, torch.rand(num_tasks, num_samples, generator=generator, dtype=torch.float64)

    def _labels(self, X: Tensor, beta: Tensor, xi: Tensor) -> Tensor:
        return (xi < torch.sigmoid((X @ beta.unsqueeze(-1)).squeeze(-1))).to(torch.float64)

    def excess_risk(self, beta_hat: Tensor, beta: Tensor) -> Tensor:
        """Exact excess logistic loss of the logit vectors ``beta_hat`` over the Bayes predictor."""
        scale = self.input_scale.to(self.device, self.dtype)
        return logistic_excess_risk(beta_hat.to(self.device, self.dtype), beta.to(self.device, self.dtype), scale)

    def metrics(self, beta_hat: Tensor, beta: Tensor) -> dict[str, Tensor]:
        scale = self.input_scale.to(self.device, self.dtype)
        return {"excess_error01": logistic_excess_error01(beta_hat.to(self.device, self.dtype), beta.to(self.device, self.dtype), scale)}


def relu_network(X: Tensor, params: Tensor, rank: int) -> Tensor:
    """Outputs ``w^T ReLU(W^T x) / sqrt(k)`` of two-layer networks given as flat parameter vectors
    ``[vec(W) (d x k, row-major), w]`` (``(R, d k + k)``) on inputs ``X`` (``(N, d)`` shared, or
    ``(R, N, d)``); returns ``(R, N)``."""
    d = params.shape[-1] // rank - 1
    W = params[..., : d * rank].reshape(*params.shape[:-1], d, rank)
    w = params[..., d * rank :]
    hidden = torch.relu(X @ W) if X.ndim == 3 else torch.relu(torch.einsum("nd,rdk->rnk", X, W))
    return (hidden @ w.unsqueeze(-1)).squeeze(-1) / math.sqrt(rank)


class ReluNetEnvironment(Environment):
    """The two-layer network environment ``relu-net``: ``y = w_t^T ReLU((W* + Delta_t)^T x) / sqrt(k) + sigma xi``.

    ``W*`` (``d x k``) has unit-norm columns (normalised Gaussian, drawn from ``seed``); ``Delta_t``
    and ``w_t`` are drawn as in ``linear`` (``||Delta_t||_F = delta``, ``w_t ~ N(0, I_k)``);
    ``x ~ N(0, I_d)``. A task's ``beta`` is ``[vec(W* + Delta_t), w_t]``. The excess risk
    ``E (f_hat(x) - f_t(x))^2`` is a Monte Carlo mean over ``test_points`` fresh inputs shared by all
    methods and targets (drawn from ``seed``), with its standard error in :meth:`metrics`.
    """

    name = "relu-net"
    model = "relu"

    def __init__(
        self,
        dim: int,
        rank: int,
        delta: float = 0.3,
        noise: float = 0.1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        test_points: int = 100_000,
    ) -> None:
        super().__init__(dim, rank, noise, device, dtype)
        self.delta = _check_delta(delta)
        self.input_scale = torch.ones(dim, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        W = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
        self._representation = W / W.norm(dim=0, keepdim=True)
        self.test_inputs = torch.randn(test_points, dim, generator=torch.Generator().manual_seed(seed + 7919), dtype=torch.float64)

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        W, w = perturbed_representations(self._representation, self.delta, num_tasks, generator)
        return torch.cat([W.flatten(1), w], dim=1)

    def _labels(self, X: Tensor, beta: Tensor, xi: Tensor) -> Tensor:
        return relu_network(X, beta, self.rank) + self.noise * xi

    def _squared_errors(self, beta_hat: Tensor, beta: Tensor) -> Tensor:
        X = self.test_inputs.to(self.device, self.dtype)
        return (relu_network(X, beta_hat.to(X), self.rank) - relu_network(X, beta.to(X), self.rank)) ** 2

    def excess_risk(self, beta_hat: Tensor, beta: Tensor) -> Tensor:
        """Monte Carlo estimate of ``E (f_hat(x) - f(x))^2`` on the shared test inputs."""
        return self._squared_errors(beta_hat, beta).mean(-1)

    def metrics(self, beta_hat: Tensor, beta: Tensor) -> dict[str, Tensor]:
        errors = self._squared_errors(beta_hat, beta)
        return {"excess_risk_se": errors.std(-1) / math.sqrt(errors.shape[-1])}


class ReluHardEnvironment(TwoBlocks, ReluNetEnvironment):
    """The nonlinear hard case ``relu-hard``: ``linear-hard``'s two blocks inside a two-layer ReLU
    network, ``y = w_t^T ReLU(W_t^T x) / sqrt(k) + sigma xi``.

    Inputs have variance ``eps`` on the first ``d - k`` coordinates and 1 on the last ``k``, as in
    ``linear-hard``. Neuron ``j`` of task ``t`` is ``c e_j + a_tj`` with ``c = sqrt(1/(2 eps))``, ``e_j``
    the opt block's ``j``-th coordinate and ``a_tj`` a uniform unit vector of the delta block (the
    last ``k`` coordinates), drawn per task; ``w_t ~ N(0, I_k)``. So the opt part of a pre-activation
    has variance ``c^2 eps = 1/2`` and the per-task delta part variance 1. The shared representation
    that fine-tuning-aware training should find is the opt block, ``W* = [I_k; 0]`` (columns
    normalised, as the model keeps them): relative to it, a task is a perturbation of size ``1/c``
    per neuron. The documentation (``docs/environments.md``) explains why the frozen objective keeps only
    part of the opt block and ADAPTREP's keeps it, with the measured evidence
    (``benchmarks/relu_hard_frozen_minimum.py``).
    """

    name = "relu-hard"

    def __init__(
        self,
        dim: int,
        rank: int,
        eps: float = 0.1,
        noise: float = 0.1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        test_points: int = 100_000,
    ) -> None:
        super().__init__(dim, rank, delta=0.0, noise=noise, seed=seed, device=device, dtype=dtype, test_points=test_points)
        self._set_blocks(eps)
        self.test_inputs = self.test_inputs * self.input_scale

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        d, k = self.dim, self.rank
        w = torch.randn(num_tasks, k, generator=generator, dtype=torch.float64)
        A = torch.randn(num_tasks, k, k, generator=generator, dtype=torch.float64)
        W = torch.zeros(num_tasks, d, k, dtype=torch.float64)
        W[:, :k, :] = self.opt_scale * torch.eye(k, dtype=torch.float64)
        W[:, d - k :, :] = A / A.norm(dim=1, keepdim=True)
        return torch.cat([W.flatten(1), w], dim=1)


class SinusoidEnvironment(Environment):
    """The sinusoid regression benchmark ``sinusoid`` of the MAML paper (Finn et al., 2017).

    Task ``t`` is ``f_t(x) = A_t sin(x - phi_t)`` with amplitude ``A_t ~ U[0.1, 5]`` and phase
    ``phi_t ~ U[0, pi]``; inputs ``x ~ U[-5, 5]`` (``X`` is ``(n, 1)``) and ``y = f_t(x) + sigma xi``
    (``sigma = 0`` by default). A task's ``beta`` is ``(A_t, phi_t)``. Predictors are the 1-40-40-1
    ReLU network (``Tasks.model = "mlp"``, :data:`adaptrep.models.MLP_WIDTHS`) given as flat parameter
    vectors (:func:`adaptrep.models.task_parameters`); the excess risk is the mean squared difference
    between the network and ``f_t`` on a grid of :attr:`GRID_POINTS` evenly spaced points of
    ``[-5, 5]`` (deterministic). There is no true representation (``representation`` is ``None``).
    """

    name = "sinusoid"
    model = "mlp"
    AMPLITUDE = (0.1, 5.0)
    PHASE = (0.0, math.pi)
    INPUT_RANGE = (-5.0, 5.0)
    GRID_POINTS = 1000

    def __init__(self, noise: float = 0.0, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> None:
        super().__init__(1, 1, noise, device, dtype)
        # scale 1 leaves the inputs of sample_inputs (x ~ U[-5, 5]) as they are in make_tasks; it is
        # not sqrt diag Sigma here (the variance is 25/3, not the 1 that covariance_diagonal reports)
        self.input_scale = torch.ones(1, dtype=torch.float64)
        self.grid = torch.linspace(*self.INPUT_RANGE, self.GRID_POINTS, dtype=torch.float64)

    @property
    def representation(self) -> Tensor | None:  # type: ignore[override]
        """None: the sinusoid environment has no true representation."""
        return None

    def sample_parameters(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """``(A_t, phi_t)`` pairs (``(T, 2)``, float64, CPU)."""
        u = torch.rand(num_tasks, 2, generator=generator, dtype=torch.float64)
        low = torch.tensor([self.AMPLITUDE[0], self.PHASE[0]], dtype=torch.float64)
        high = torch.tensor([self.AMPLITUDE[1], self.PHASE[1]], dtype=torch.float64)
        return low + (high - low) * u

    def sample_inputs(self, num_tasks: int, num_samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Uniform inputs on ``[-5, 5]`` (``(T, n, 1)``) and standard normal noise draws."""
        low, high = self.INPUT_RANGE
        Z = low + (high - low) * torch.rand(num_tasks, num_samples, 1, generator=generator, dtype=torch.float64)
        return Z, torch.randn(num_tasks, num_samples, generator=generator, dtype=torch.float64)

    @staticmethod
    def sinusoid(x: Tensor, beta: Tensor) -> Tensor:
        """``A_t sin(x - phi_t)`` for inputs ``x`` (``(N,)`` shared or ``(T, N)``) -> ``(T, N)``."""
        return beta[:, :1] * torch.sin(x - beta[:, 1:])

    def _labels(self, X: Tensor, beta: Tensor, xi: Tensor) -> Tensor:
        return self.sinusoid(X[..., 0], beta) + self.noise * xi

    def predict(self, beta_hat: Tensor, x: Tensor) -> Tensor:
        """Outputs ``(R, N)`` of the networks ``beta_hat`` (``(R, p)`` flat parameters) at the inputs ``x`` (``(N,)``)."""
        theta, w = unflatten_mlp(beta_hat, MLP_WIDTHS)
        features = mlp_model(MLP_WIDTHS).features(theta, x.reshape(1, -1, 1).expand(beta_hat.shape[0], -1, 1))
        return (features @ w.unsqueeze(-1)).squeeze(-1)

    def excess_risk(self, beta_hat: Tensor, beta: Tensor) -> Tensor:
        """``(1/N) sum_i (f_hat(x_i) - f_t(x_i))^2`` over the grid, one value per task."""
        grid = self.grid.to(self.device, self.dtype)
        prediction = self.predict(beta_hat.to(self.device, self.dtype), grid)
        return ((prediction - self.sinusoid(grid, beta.to(self.device, self.dtype))) ** 2).mean(-1)


SETTINGS = ("linear", "linear-hard", "logistic", "relu-net", "relu-hard", "sinusoid")


def make_environment(
    setting: str,
    *,
    dim: int,
    rank: int,
    noise: float,
    delta: float = 0.4,
    eps: float = 0.1,
    scale: float = 3.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Environment:
    """Build a standard environment by name (one of :data:`SETTINGS`; ``sinusoid`` ignores ``dim``,
    ``rank`` and the other environments' parameters)."""
    if setting == "linear":
        return LinearEnvironment(dim, rank, delta=delta, noise=noise, seed=seed, device=device, dtype=dtype)
    if setting == "linear-hard":
        return LinearHardEnvironment(dim, rank, eps=eps, noise=noise, seed=seed, device=device, dtype=dtype)
    if setting == "logistic":
        return LogisticEnvironment(dim, rank, delta=delta, scale=scale, seed=seed, device=device, dtype=dtype)
    if setting == "relu-net":
        return ReluNetEnvironment(dim, rank, delta=delta, noise=noise, seed=seed, device=device, dtype=dtype)
    if setting == "relu-hard":
        return ReluHardEnvironment(dim, rank, eps=eps, noise=noise, seed=seed, device=device, dtype=dtype)
    if setting == "sinusoid":
        return SinusoidEnvironment(noise=noise, seed=seed, device=device, dtype=dtype)
    raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
