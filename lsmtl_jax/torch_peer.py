"""The benchmark's PyTorch peer: Deep-LSMTL's network, loss and optimizer in
PyTorch, written the way a PyTorch user would, for side-by-side speed checks.

`python -m lsmtl_jax.benchmark --torch=auto|on` runs it as a subprocess, once
per repeat and mode; by hand::

  python -m lsmtl_jax.torch_peer --hidden 512 --layers 2 --batch 256 \
      --bottleneck 128 --mode compile

It trains on one random batch and prints one JSON line::

  {"impl": "torch" | "torch.compile", "mode": "eager" | "compile", "torch": version,
   "threads": n, "step_s": s, "examples_per_s": n, "flops_per_example": n,
   "compile_s": s (compile mode: compile + first step), "first_step_s": s}

or, when this mode cannot run here (e.g. torch.compile without a working C++
compiler), {"mode": ..., "skipped": why} and exit status 3.

The network (lsmtl_jax.models, lsmtl_jax.objectives):
  * DenseNet trunk: block i = BatchNorm -> Linear(hidden) -> LeakyReLU(0.2) ->
    Dropout over the concatenation of the input and every earlier block's
    output; a linear head over the full concatenation to the T targets.
  * With --bottleneck k (lam > 0): g(u) = V LeakyReLU(U u + c) + d (T -> k -> T),
    a Bernoulli(mask_rate) mask m per (example, task), and
    loss = mean (y_hat - y)^2 + lam * sum(m (y_hat - g((1 - m) y_hat))^2) / sum(m).
  * Adam (torch defaults: betas 0.9/0.999, eps 1e-8, as optax.adam); LeCun-normal
    kernels and zero biases, as Flax's Dense here.

Modes: 'eager', and 'compile' = torch.compile of the forward pass with the mask
and loss (its backward compiled by AOTAutograd) and of the Adam update, the two
graphs a speed-minded PyTorch user compiles. Compilation (the first step) is
excluded from the timing and reported as compile_s.

With the same weights, its forward pass (train and eval mode), loss, gradients
and Adam step agree with the JAX model's to float32 rounding
(tests/test_benchmark.py). Differences, none of which favours JAX: JAX pads
the head and bottleneck to a multiple of 128 targets (9,520 -> 9,600) and
masks the padding out, here T is exact (slightly less work for PyTorch); JAX
also checks every step's loss and gradient norm for non-finite values; the
random streams differ; the learning rate is constant here (a schedule in
training: the same arithmetic); BatchNorm's running variance is the unbiased
batch variance here, the biased one in Flax (read in eval mode only).

Only this module imports torch: it is the `bench` extra
(pip install -e '.[bench]'), never a dependency of the package.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

MODES = ("eager", "compile")


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
  """Flax's lecun_normal for a (out, in) Linear weight: a normal of variance
  1 / fan_in truncated at two standard deviations (rescaled to keep the variance)."""
  fan_in = weight.shape[1]
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  with torch.no_grad():
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def _linear(n_in: int, n_out: int) -> nn.Linear:
  layer = nn.Linear(n_in, n_out)
  lecun_normal_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


class TaskRelation(nn.Module):
  """g(u) = V LeakyReLU(U u + c) + d: the T -> k -> T bottleneck over the outputs."""

  def __init__(self, num_targets: int, bottleneck: int, negative_slope: float = 0.2):
    super().__init__()
    self.encode = _linear(num_targets, bottleneck)
    self.decode = _linear(bottleneck, num_targets)
    self.negative_slope = negative_slope

  def forward(self, u: torch.Tensor) -> torch.Tensor:
    return self.decode(nn.functional.leaky_relu(self.encode(u), self.negative_slope))


class DenseNetLSMTL(nn.Module):
  """The DenseNet regressor (`forward` gives y_hat) and, with bottleneck > 0,
  the task relation g as `relation` (None otherwise)."""

  def __init__(self, n_in: int, n_out: int, hidden: int, layers: int, dropout: float = 0.1,
               negative_slope: float = 0.2, bottleneck: int = 0,
               relation_slope: float = 0.2):
    super().__init__()
    self.blocks = nn.ModuleList()
    width = n_in
    for _ in range(layers):
      # Flax's momentum 0.9 keeps 0.9 of the running average; torch's 0.1 is the new share.
      self.blocks.append(nn.Sequential(
          nn.BatchNorm1d(width, eps=1e-5, momentum=0.1), _linear(width, hidden),
          nn.LeakyReLU(negative_slope), nn.Dropout(dropout)))
      width += hidden
    self.head = _linear(width, n_out)
    self.relation = TaskRelation(n_out, bottleneck, relation_slope) if bottleneck else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    features = [x]
    for block in self.blocks:
      features.append(block(torch.cat(features, dim=1) if len(features) > 1 else x))
    return self.head(torch.cat(features, dim=1))


def lsmtl_loss(model: DenseNetLSMTL, y_hat: torch.Tensor, y: torch.Tensor,
               mask: torch.Tensor | None, lam: float):
  """(total, task loss, reconstruction loss); mask: 1.0 = a hidden task."""
  task = torch.mean(torch.square(y_hat - y))
  if model.relation is None or mask is None or lam == 0:
    return task, task, torch.zeros_like(task)
  reconstruction = model.relation((1.0 - mask) * y_hat)
  rec = torch.sum(mask * torch.square(y_hat - reconstruction)) / torch.clamp(mask.sum(), min=1.0)
  return task + lam * rec, task, rec


def load_jax_params(model: DenseNetLSMTL, regressor: Mapping[str, Any],
                    relation: Mapping[str, Any] | None = None,
                    batch_stats: Mapping[str, Any] | None = None) -> DenseNetLSMTL:
  """Copy Flax weights into `model`: `regressor` = models.Regressor's params
  ({'trunk': {'block{i}_norm', 'block{i}_dense'}, 'head'}), `relation` =
  models.TaskRelation's ({'encode', 'decode'}), `batch_stats` the regressor's
  BatchNorm statistics. Flax kernels are (in, out), torch weights (out, in).

  A target axis padded wider than the model's T (as training pads it) is cut
  to T: the padded outputs are masked out of both JAX loss terms and padded
  inputs of g are zero, so the losses agree.
  """
  def put(tensor, value, transpose=False):
    value = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
    value = value.T if transpose else value
    if value.shape != tensor.shape:  # a padded target axis
      value = value[tuple(slice(0, n) for n in tensor.shape)]
    with torch.no_grad():
      tensor.copy_(value)

  def dense(layer, p):
    put(layer.weight, p["kernel"], transpose=True)
    put(layer.bias, p["bias"])

  trunk = regressor["trunk"]
  for i, block in enumerate(model.blocks):
    norm, linear = block[0], block[1]
    put(norm.weight, trunk[f"block{i}_norm"]["scale"])
    put(norm.bias, trunk[f"block{i}_norm"]["bias"])
    if batch_stats is not None:
      stats = batch_stats["trunk"][f"block{i}_norm"]
      put(norm.running_mean, stats["mean"])
      put(norm.running_var, stats["var"])
    dense(linear, trunk[f"block{i}_dense"])
  dense(model.head, regressor["head"])
  if model.relation is not None:
    if relation is None:
      raise ValueError("the model has a bottleneck: pass the TaskRelation's params")
    dense(model.relation.encode, relation["encode"])
    dense(model.relation.decode, relation["decode"])
  return model


def flops_per_example(n_in: int, n_out: int, hidden: int, layers: int, bottleneck: int) -> int:
  """6 x the dense layers' multiply-adds (forward + backward), as perf.py counts."""
  macs, width = 0, n_in
  for _ in range(layers):
    macs += width * hidden
    width += hidden
  macs += width * n_out + 2 * n_out * bottleneck
  return 6 * macs


class TrainStep:
  """One Adam step on (x, y): the mask drawn, loss, backward, update.

  mode='compile' compiles the objective (forward, mask, loss; backward via
  AOTAutograd) and the optimizer update; both compile on the first call.
  """

  def __init__(self, model: DenseNetLSMTL, lr: float, lam: float, mask_rate: float,
               mode: str = "eager"):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    self.model, self.lam, self.mask_rate = model, lam, mask_rate
    self.optimizer = torch.optim.Adam(model.parameters(), lr)
    objective, update = self._objective, self.optimizer.step
    if mode == "compile":
      objective, update = torch.compile(objective), torch.compile(update)
    self.objective, self.update = objective, update

  def _objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_hat = self.model(x)
    mask = None
    if self.model.relation is not None and self.lam > 0:
      mask = (torch.rand_like(y_hat) < self.mask_rate).to(y_hat.dtype)
    return lsmtl_loss(self.model, y_hat, y, mask, self.lam)[0]

  def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.objective(x, y)
    loss.backward()
    self.update()
    return loss.detach()


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--n_in", type=int, default=943)
  p.add_argument("--n_out", type=int, default=9520)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
  p.add_argument("--bottleneck", type=int, default=0,
                 help="k; 0: the plain DenseNet, no reconstruction term")
  p.add_argument("--mask_rate", type=float, default=0.1)
  p.add_argument("--lam", type=float, default=0.1)
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--threads", type=int, default=0, help="0: torch's default")
  p.add_argument("--mode", choices=MODES, default="eager")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _reason(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 300 else text[:297] + "..."


def main(argv=None) -> int:
  a = _parse(argv)
  if a.threads:
    torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  bottleneck = a.bottleneck if a.lam > 0 else 0
  model = DenseNetLSMTL(a.n_in, a.n_out, a.hidden, a.layers, a.dropout, bottleneck=bottleneck)
  model.train()
  step = TrainStep(model, a.lr, a.lam, a.mask_rate, a.mode)
  x = torch.randn(a.batch, a.n_in)
  y = torch.randn(a.batch, a.n_out)
  impl = "torch.compile" if a.mode == "compile" else "torch"

  start = time.perf_counter()
  try:
    float(step(x, y))
  except Exception as e:  # pylint: disable=broad-except
    if a.mode != "compile":
      raise
    print(json.dumps({"impl": impl, "mode": a.mode, "torch": torch.__version__,
                      "skipped": f"torch.compile failed: {_reason(e)}"}), flush=True)
    return 3
  first = time.perf_counter() - start
  for _ in range(a.warmup - 1):
    step(x, y)
  start = time.perf_counter()
  for _ in range(a.steps):
    loss = step(x, y)
  float(loss)
  seconds = (time.perf_counter() - start) / a.steps
  out = {"impl": impl, "mode": a.mode, "torch": torch.__version__,
         "threads": torch.get_num_threads(), "step_s": seconds,
         "examples_per_s": a.batch / seconds, "first_step_s": first,
         "flops_per_example": flops_per_example(a.n_in, a.n_out, a.hidden, a.layers,
                                                bottleneck),
         "loss": float(loss)}
  if a.mode == "compile":
    out["compile_s"] = first
  print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
