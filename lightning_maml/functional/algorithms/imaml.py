"""Implicit MAML (Rajeswaran et al. 2019): implicit meta-gradients of a regularised inner
problem."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_maml._checks import check_count, check_inner_lr
from lightning_maml.episode import Episode
from lightning_maml.functional.algorithms.base import (
    Algorithm,
    TaskContext,
)


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def _gradient_on(
    context: TaskContext, x: Tensor, y: Tensor
) -> Callable[[dict[str, Tensor], Mapping[str, Tensor]], dict[str, Tensor]]:
    """``(moving, others) ->`` the gradient of the loss on ``(x, y)`` with respect to ``moving``
    (``others``: the rest of the parameters)."""

    def loss(moving: dict[str, Tensor], others: Mapping[str, Tensor]) -> Tensor:
        return context.loss({**others, **moving}, x, y)

    return torch.func.grad(loss)


class IMAML(Algorithm):
    """Implicit MAML (Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients").

    Each task solves a regularised inner problem, ``min_phi L_support(phi) + lam/2 ||phi -
    theta||^2``, approximately, by ``inner_steps`` gradient steps of size ``inner_lr`` from
    ``theta``, keeping no graph. The meta-gradient of the query loss at the solution ``phi*`` is
    the implicit one, ``(I + H/lam)^-1 grad L_query(phi*)`` with ``H`` the support loss's Hessian
    at ``phi*``, solved by ``cg_steps`` iterations of conjugate gradient on Hessian-vector
    products (stopping early, per task, once the residual's norm is at most ``cg_tol`` times the
    right-hand side's). Memory does not grow with ``inner_steps``: the point of it for long
    adaptations.

    Parameters that do not adapt (``adapt``) get the gradient of the query loss through
    ``phi*`` as well: ``dL/dtheta_f - (1/lam) M^T v`` with ``M`` the support gradient's
    derivative with respect to them and ``v`` the solve above.

    The update is the gradient of the query loss at the exact minimiser of the regularised
    problem; with finitely many inner steps and CG iterations it approximates it (no
    finite-difference check of the ``inner_steps``-step loss applies: the engine's ``loss`` is the
    query loss at ``phi``, its gradient the implicit one).

    That gradient exists where the regularised problem is convex at ``phi``: ``I + H/lam``
    positive definite, i.e. no Hessian eigenvalue of the support loss at or below ``-lam``.
    Where conjugate gradient meets a direction of zero or negative curvature of ``I + H/lam``,
    the system has no such solution (CG's iterates then depend on rounding and can grow without
    bound), and that task's meta-gradient, with the meta-loss, is NaN rather than a number: a
    :class:`~lightning_maml.MAMLModule` then stops (or skips the step, ``on_nonfinite="skip"``)
    and says so. A larger ``lam`` keeps the problem convex.

    Exactly when that guard holds: CG meets such a direction within its ``cg_steps`` iterations
    (those before its residual falls below ``cg_tol``) exactly when ``I + H/lam`` is not positive
    definite on the Krylov subspace those iterations span, from the query gradient. With as
    many iterations as adapted parameters (in exact arithmetic) that is whenever the problem is
    not convex; with fewer, e.g. the default 5, a non-convex task whose query gradient barely
    reaches the negative directions can get a finite meta-gradient that solves the system only
    on that subspace: not the implicit gradient, which does not exist there. The guard is a
    detector of what CG saw, not a proof of convexity; a ``lam`` above the magnitude of the most
    negative Hessian eigenvalue is what makes every task's gradient exist.

    Args:
        lam: the regularisation strength ``lam`` > 0 (larger: ``phi*`` stays nearer ``theta``);
            it must exceed the magnitude of the support loss's most negative Hessian eigenvalue
            (the default 1.0 suits losses of a classifier's scale; the sinusoid MLP's regression
            needs 100 at initialisation and more as it trains), and the inner steps converge
            for ``inner_lr * (lam + h) < 2``, ``h`` the largest eigenvalue.
        cg_steps: conjugate-gradient iterations (0: the first-order approximation, the gradient
            of the query loss at ``phi*`` itself).
        cg_tol: relative residual at which CG stops, >= 0 (0: run every iteration).
        first_order: the first-order approximation regardless of ``cg_steps``.
        adapt: which parameters adapt (see :class:`Algorithm`).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_maml.functional import meta_loss
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> sx, sy, qx, qy = (torch.randn(4, 5, 1) for _ in range(4))
        >>> out = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, inner_steps=20,
        ...                 algorithm=IMAML(lam=2.0))
        >>> out.loss.backward()
    """

    name = "imaml"
    has_objective = False
    update_note = (
        "its update is the implicit gradient at the exact minimiser of the regularised inner "
        "problem, which finitely many inner steps only approach"
    )
    nonfinite_note = (
        "implicit MAML marks with NaN the meta-gradient of a task whose regularised inner problem "
        "is not convex at its adapted parameters (conjugate gradient met non-positive curvature "
        "of I + H/lam, H the support loss's Hessian): no implicit gradient exists there; a larger "
        "lam (above the magnitude of H's most negative eigenvalue) keeps it convex"
    )

    def __init__(
        self,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_tol: float = 1e-10,
        first_order: bool = False,
        adapt: Sequence[str] | None = None,
    ) -> None:
        super().__init__(first_order=first_order, adapt=adapt)
        self.lam = check_inner_lr(lam, "lam", positive=True)
        self.cg_steps = check_count(cg_steps, "cg_steps", minimum=0)
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not cg_tol >= 0:
            raise ValueError(f"`cg_tol` must be a number >= 0, got {cg_tol!r}")
        self.cg_tol = float(cg_tol)

    def task(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        episode: Episode,
        step_weights: Tensor | None = None,
        anchor: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        names = self.adapted(params)
        theta = {n: params[n] for n in names}
        fixed = {n: p for n, p in params.items() if n not in theta}
        # first order: gradients at the anchor (finite differences around it); else at params
        at = anchor[0] if anchor is not None else params
        center, still, support_grad, phi = self._inner_solve(
            context, at, episode.support_x, episode.support_y
        )
        prediction, query_loss = self.query(context, {**fixed, **phi}, episode)
        query_grad = _gradient_on(context, episode.query_x, episode.query_y)
        rhs = {n: g.detach() for n, g in query_grad(phi, still).items()}
        if context.first_order or self.cg_steps == 0:
            v = rhs
        else:
            v = self._solve(lambda m: support_grad(m, still), phi, rhs)
        # a surrogate with the query loss's value and the implicit gradient
        objective = query_loss + sum(((theta[n] - center[n]) * v[n]).sum() for n in names)
        if not context.first_order and any(p.requires_grad for p in fixed.values()):
            cross = _dot(support_grad(phi, fixed), v)
            objective = objective - (cross - cross.detach()) / self.lam
        return objective, query_loss, prediction

    def _inner_solve(
        self,
        context: TaskContext,
        at: Mapping[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
    ) -> tuple[
        dict[str, Tensor], dict[str, Tensor], Callable[..., dict[str, Tensor]], dict[str, Tensor]
    ]:
        """The regularised inner problem from ``at``: ``(center, still, support_grad, phi)``,
        ``center`` the adapting parameters' values, ``still`` the others', ``support_grad`` the
        support loss's gradient as a function ``(phi, still)``, and ``phi`` the values after
        ``inner_steps`` gradient steps on ``L_support(phi) + lam/2 ||phi - center||^2`` from
        ``center`` (no graph)."""
        names = self.adapted(at)
        center = {n: at[n].detach() for n in names}
        still = {n: p.detach() for n, p in at.items() if n not in center}
        support_grad = _gradient_on(context, support_x, support_y)
        phi, lr = dict(center), context.inner_lr
        for _ in range(context.inner_steps):
            g = support_grad(phi, still)
            phi = {
                n: (phi[n] - lr * (g[n] + self.lam * (phi[n] - center[n]))).detach() for n in phi
            }
        return center, still, support_grad, phi

    def adapt_values(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
    ) -> dict[str, Tensor]:
        _, still, _, phi = self._inner_solve(context, params, support_x, support_y)
        return {**still, **phi}

    def _solve(
        self,
        gradient: Callable[[dict[str, Tensor]], dict[str, Tensor]],
        phi: dict[str, Tensor],
        rhs: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """``(I + H/lam)^-1 rhs`` by conjugate gradient, ``H`` the Jacobian of ``gradient`` (the
        support loss's Hessian) at ``phi``; Hessian-vector products by reverse mode twice, the
        one second derivative the engine relies on everywhere. Fixed iterations (vmap and
        compile need them); a task whose residual is small enough stops changing. A direction of
        zero or negative curvature (``p @ A p <= 0``: ``A`` not positive definite, the system
        without the solution the implicit gradient needs) makes the task's result NaN."""
        _, hvp = torch.func.vjp(gradient, phi)

        def operator(u: dict[str, Tensor]) -> dict[str, Tensor]:
            (h,) = hvp(u)
            return {n: (u[n] + h[n] / self.lam).detach() for n in u}

        x = {n: torch.zeros_like(r) for n, r in rhs.items()}
        r = dict(rhs)
        p = dict(rhs)
        rr = _dot(r, r)
        stop = rr * self.cg_tol**2
        indefinite = torch.zeros_like(rr, dtype=torch.bool)
        zero = torch.zeros_like(rr)
        for _ in range(self.cg_steps):
            active = (rr > stop) & ~indefinite
            ap = operator(p)
            curvature = _dot(p, ap)
            indefinite = indefinite | (active & ~(curvature > 0))  # NaN counts as non-positive
            active = active & ~indefinite
            alpha = torch.where(active, rr / curvature, zero)
            x = {n: x[n] + alpha * p[n] for n in x}
            r = {n: r[n] - alpha * ap[n] for n in r}
            new_rr = _dot(r, r)
            beta = torch.where(active, new_rr / rr, zero)
            p = {n: r[n] + beta * p[n] for n in p}
            rr = torch.where(active, new_rr, rr)
        undefined = torch.full_like(rr, math.nan)
        return {n: torch.where(indefinite, undefined, x[n]) for n in x}

    def extra_repr(self) -> str:
        parts = [f"lam={self.lam}", f"cg_steps={self.cg_steps}", f"cg_tol={self.cg_tol}"]
        if self.first_order:
            parts.append("first_order=True")
        if self.adapt is not None:
            parts.append(f"adapt={self.adapt}")
        return ", ".join(parts)
