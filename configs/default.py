"""Defaults shared by every config: the paper's GEO Deep-LSMTL setting.

Other configs import this and override a few fields. Any field can be set on
the command line, e.g. `--config.model.hidden=512 --config.lsmtl.lam=0.5`.
"""

import ml_collections
from ml_collections import config_dict

# Configs sit above the package: they may use its API, the package never
# imports them (it reads them as data through --config).
from lsmtl_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # 'deep_lsmtl' (DenseNet + masked-task bottleneck), 'densenet' (the same with
  # lam = 0), 'dgex' (MLP trunk, tanh, lam = 0) or 'lsr' (closed-form ridge).
  config.method = "deep_lsmtl"
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # a prepared dataset directory (python -m lsmtl_jax.prepare)
  # enabled: generate the synthetic demo compendium into cache_dir on first use
  # (lsmtl_jax/data/synthetic.py documents its structure) instead of reading path.
  config.data.synthetic = ml_collections.ConfigDict(dict(
      enabled=False, num_samples=8000, num_landmarks=943, num_targets=9520,
      num_programs=24, num_modules=120, num_tissues=12, seed=0))
  config.data.cache_dir = "~/.cache/lsmtl_jax"
  config.data.prefetch = 4  # batches read ahead by the host loader (placement 'host')
  # Where training batches come from (lsmtl_jax/resident.py): 'host' reads each
  # batch's rows from the store on a background thread; 'device' puts the
  # training rows on the devices once (split over mesh 'data') and gathers each
  # batch there; 'auto' is 'device' when that matrix fits 25 % of a device's
  # memory. The batches, and so the results, are the same either way.
  config.data.placement = "auto"
  # Read the whole dataset into host RAM once (when it fits) instead of reading
  # each batch's rows from the store: the host path and evaluation read from it.
  config.data.in_memory = False
  # Cross-platform setting: validate / test on other prepared datasets (whole
  # dataset splits), e.g. 1000G and GTEx mapped onto the GEO reference.
  config.data.val_path = ""
  config.data.test_path = ""
  # True: both must be set (a run is refused rather than falling back on the
  # training dataset's own val/test splits); configs/gtex.py sets it.
  config.data.require_external_eval = False
  config.data.train_split = "train"
  # > 0: train on this many profiles of the training split (a fixed-seed subset,
  # the same for every method and seed), e.g. for a learning curve.
  config.data.max_train = 0
  # > 0: hold this fraction of the validation split out (a fixed-seed subset)
  # to calibrate prediction intervals; training never evaluates on it.
  config.data.calibration_fraction = 0.0
  config.data.val_split = "val"
  config.data.test_split = "test"

  config.model = ml_collections.ConfigDict()
  config.model.trunk = "densenet"  # or 'mlp' (D-GEX)
  config.model.hidden = 9000
  config.model.depth = 3
  config.model.dropout = 0.1
  config.model.negative_slope = 0.2  # LeakyReLU slope in the DenseNet blocks
  config.model.batch_norm = True
  config.model.activation = "tanh"  # MLP trunk only
  # Matmul dtype (parameters stay float32): 'auto' = bfloat16 on GPU and TPU,
  # float32 on CPU, where bfloat16 measured slower (docs/performance.md).
  config.model.dtype = "auto"
  # 'lsr': start the head from the closed-form ridge solution (lsr.ridge, on the
  # training rows): kernel rows of the raw landmarks = W, the others 0, bias = b,
  # so the untrained network predicts what LSR does. DenseNet trunk only.
  config.model.head_init = "default"

  # The masked-task bottleneck regularizer (docs/method.md, "Deep-LSMTL objective").
  config.lsmtl = ml_collections.ConfigDict()
  # Weight of L_rec (0 gives the plain DenseNet), or 'auto': one run per value
  # of lam_candidates (WORKDIR/lam/<value>/, each resumable), and the one with
  # the lowest validation MAE (ties: the smaller lam) becomes WORKDIR's run
  # (docs/training.md, "lam = 'auto'"). 0 among the candidates makes the result
  # never worse on validation than the same network without the term; 0.01
  # and 0.1 are what validation chose in the regime study (docs/reproducing.md).
  # A field of any type, so --config.lsmtl.lam=0.1 and =auto both parse.
  config.lsmtl.lam = config_dict.FieldReference("auto", field_type=object)
  config.lsmtl.lam_candidates = (0.0, 0.01, 0.1)
  config.lsmtl.bottleneck = 256  # k
  config.lsmtl.mask_rate = 0.1  # rho
  config.lsmtl.mask_per = "example"  # or 'batch'
  config.lsmtl.negative_slope = 0.2
  config.lsmtl.stop_gradient_target = False
  # Other readings of the loss (defaults: the one above). detach_input: g's
  # input (1 - m) y_hat is detached, so the regressor is shaped only through the
  # target (with stop_gradient_target too, the term trains g alone).
  config.lsmtl.detach_input = False
  # > 0: L_rec's weight ramps linearly, lam * min(1, step / warmup_steps).
  config.lsmtl.warmup_steps = 0
  # g's learning rate is optim.learning_rate times this.
  config.lsmtl.relation_lr_scale = 1.0
  # What g sees: 'prediction', r = g((1 - m) y_hat), or 'target', r = g((1 - m) y)
  # with the true targets (the term then reaches the regressor only through the
  # reconstruction target y_hat).
  config.lsmtl.relation_input = "prediction"
  # 'outputs': g reconstructs masked tasks from the visible ones; 'hidden': g
  # maps the trunk's output features, a random mask_rate of them hidden, to
  # every task's output (docs/method.md, "Other readings").
  config.lsmtl.relation_on = "outputs"
  # Evaluate (1 - w) y_hat + w g_loo(y_hat), g_loo reconstructing each task
  # with its group of tasks hidden, w in test_blend_weights chosen on the
  # validation MAE after training (lsmtl_jax/blending.py).
  config.lsmtl.test_blend = False
  config.lsmtl.test_blend_weights = (0.0, 0.25, 0.5)

  config.loss = ml_collections.ConfigDict()
  config.loss.task = "mse"  # or 'mae'

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # or 'adamw', 'sgd'
  config.optim.learning_rate = 5e-4
  config.optim.schedule = "cosine"  # 'constant', 'cosine', 'warmup_cosine'
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 0.0  # 0: no clipping

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256
  config.train.num_epochs = 100
  config.train.num_steps = -1  # > 0 overrides num_epochs
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  config.train.patience = 10  # evaluations without a better val MAE before stopping
  config.train.eval_batch_size = 1024
  # A non-finite loss or gradient norm: 'stop' (the last good checkpoint stays
  # the latest) or 'skip' the step (counted and logged).
  config.train.nonfinite = "stop"
  # Measure the matmul peak (~3 s) for the MFU in the log and results.json.
  config.train.measure_peak = True

  # Device mesh: 'data' splits the batch, 'model' splits the target axis (head,
  # bottleneck, per-gene metrics). -1 takes the devices the other axis leaves.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 1
  config.mesh.fsdp = False  # also split trunk kernels' hidden axis over 'data'
  # The head is padded to a multiple of this (independent of the mesh, so
  # checkpoints move between mesh shapes); mesh.model must divide the result.
  config.mesh.target_multiple = 128

  config.lsr = ml_collections.ConfigDict()
  config.lsr.ridge = 1e-3  # added to the diagonal of X^T X / n

  # Write WORKDIR/report/ (genes.tsv, figures, report.html) after training.
  config.report = True

  # Other methods to run on the same data after this one, and tabulate beside it.
  config.compare_with = ()

  # Estimated training memory above this stops a network run before it
  # allocates (the paper's out-of-memory cells). 0: the device's own memory.
  config.memory = ml_collections.ConfigDict({"limit_gb": 0.0})
  # Each method's own section (lsr_l1, knn, semigan, go_mtl, cnmtl, amtl,
  # amtfl), with the defaults its record in lsmtl_jax/methods/ documents.
  return config_lib.with_method_sections(config)
