"""LSR-L1: the lasso for every target at once, by FISTA on the full weight matrix.

With centred data the objective (1/2n)||Y - X W - b||^2 + alpha ||W||_1 depends
on the data only through Cxx = X'X/n and Cxy = X'Y/n (float64, one streamed
pass, shared with LSR), so an iteration costs one (L x L) @ (L x T) product
however many samples there are:

  W <- soft(Z - (Cxx Z - Cxy) / Lip, alpha / Lip),  Lip = largest eigenvalue of Cxx,

with Nesterov momentum on Z. The intercept is not penalized: b = mean_y - mean_x W.
Alphas are solved smallest first, each started from the previous solution and
the first from the ridge solution, which is close to it: few iterations each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def soft_threshold(v, t):
  return jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, 0.0)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def fista(cxx, cxy, w0, alpha, lipschitz, max_iters: int, tol: float):
  """(W, iterations): FISTA until the relative change of W is below tol."""
  step = 1.0 / lipschitz

  def body(carry):
    w, z, t, it, _ = carry
    w_new = soft_threshold(z - step * (cxx @ z - cxy), alpha * step)
    t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    z_new = w_new + ((t - 1.0) / t_new) * (w_new - w)
    change = jnp.linalg.norm(w_new - w) / jnp.maximum(jnp.linalg.norm(w_new), 1e-12)
    return w_new, z_new, t_new, it + 1, change

  def cond(carry):
    return (carry[3] < max_iters) & (carry[4] > tol)

  init = (w0, w0, jnp.ones((), w0.dtype), jnp.zeros((), jnp.int32),
          jnp.full((), jnp.inf, w0.dtype))
  w, _, _, iters, _ = jax.lax.while_loop(cond, body, init)
  return w, iters


def objective(cxx, cxy, w, alpha) -> float:
  """The lasso objective up to the constant (1/2n)||Y_c||^2, in float64."""
  cxx, cxy, w = (np.asarray(a, np.float64) for a in (cxx, cxy, w))
  return float(0.5 * np.sum(w * (cxx @ w)) - np.sum(w * cxy) + alpha * np.abs(w).sum())


def path(mean_x, mean_y, cxx, cxy, alphas, max_iters: int, tol: float, ridge: float = 1e-3):
  """[(alpha, W, b, iterations)] for each alpha, in increasing alpha order."""
  lipschitz = float(np.linalg.eigvalsh(cxx)[-1])
  w = np.linalg.solve(cxx + ridge * np.eye(len(cxx)), cxy)
  cxx32, cxy32 = jnp.asarray(cxx, jnp.float32), jnp.asarray(cxy, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  out = []
  for alpha in sorted(alphas):
    w, iters = fista(cxx32, cxy32, w, jnp.float32(alpha), jnp.float32(lipschitz), max_iters,
                     jnp.float32(tol))
    w_host = np.asarray(w, np.float64)
    out.append((float(alpha), w_host, mean_y - mean_x @ w_host, int(iters)))
  return out
