"""When does the task-relation term pay? Tuned Deep-LSMTL against the tuned same
network with lam = 0, as a function of the number of training profiles and of
the trunk's width (and so the head's share of the parameters), on two
compendia: the embedded synthetic one and a GEO-shaped GCTx with HG-U133A-style
probe ids put through `python -m lsmtl_jax.prepare` (probe averaging, dedup,
quantile normalization), both with 943 landmarks and 2,000 targets.

  python -m lsmtl_jax.experiments --config=configs/experiments/regimes.py --workdir=runs/regimes

Each cell (dataset, training profiles, width) has two arms: lam = 0 tries
three dropout rates; Deep-LSMTL then tries three values of lam on top of the
dropout lam = 0 chose (so the term is judged against a tuned network, not
against a dropout difference; --config.study.lsmtl_on_lam0_choice=False gives
the earlier plan, lam at a fixed dropout of 0.1). Each arm's setting is chosen
on validation MAE from one seed, then rerun with three seeds and evaluated on
test once per seed (lsmtl_jax/tuning.py). Other readings of the loss (docs/method.md) run at
one width on the GEO-shaped compendium and are paired with the lam = 0 arm of
the same reading (LSR head initialisation changes both arms) or of the
default reading (none by default: add them with --config.study.readings).
144 runs: 44 min from a clean workdir at --jobs=2 on 2 CPU cores (measured,
data generation and preparation included).

Outputs: regimes.png (gain vs training profiles, one curve per width, seed
error bars), regimes.md / regimes.json (every cell, chosen settings, per-seed
gains, paired per-gene test). Resumable: finished runs are skipped.
"""

import os

import ml_collections

from configs import default

TITLE = "Regime study: tuned Deep-LSMTL vs tuned lam = 0"


def get_config():
  config = default.get_config()
  config.lsmtl.lam = 0.1  # pinned (the default before 'auto'); the study searches lam itself
  config.data.synthetic.update(dict(num_samples=6400, num_landmarks=943, num_targets=2000))
  config.data.cache_dir = "~/.cache/lsmtl_jax"
  config.model.depth = 2
  config.model.dropout = 0.1
  config.lsmtl.bottleneck = 128
  config.optim.learning_rate = 1e-3
  config.train.batch_size = 64
  config.train.log_every = 100
  config.train.eval_batch_size = 320
  config.train.patience = 4
  config.report = False
  config.train.measure_peak = False  # hundreds of short runs: no MFU
  config.study = ml_collections.ConfigDict(dict(
      datasets=("synthetic", "geo_shaped"),
      n_train=(300, 1200, 4800),
      widths=(128, 512),
      # Other readings, at the first width: name -> overrides of both arms
      # ('lam0' marks one that also changes the lam = 0 arm).
      # Other readings (READINGS below: 'detach_input', 'warmup', 'relation_lr',
      # 'lsr_head', 'target_input', 'hidden', 'test_blend'), e.g. --config.study.readings="('detach_input','lsr_head')";
      # none in the default plan, which is sized for an hour on 2 cores.
      readings=(),
      # > 0: trunk blocks of every cell (else model.depth, 2); cells are then
      # named -d<depth>, e.g. the wide cell --config.study.depth=3
      # --config.study.widths="(1024,)": 943 + 3 x 1,024 features into 2,000 targets.
      depth=0,
      # False: the default reading's Deep-LSMTL arm is left out (its lam = 0 arm,
      # which the other readings pair with, stays): for adding readings to a
      # study whose default rows are already measured.
      default_lsmtl=True,
      reading_width=128, reading_datasets=("geo_shaped",), reading_n_train=(),  # () = all
      lam_values=(0.01, 0.1, 1.0),
      lsmtl_on_lam0_choice=True,
      dropout_values=(0.0, 0.1, 0.3),
      seeds=3,
      # Steps: `epochs` passes over the training profiles, within [min, max].
      epochs=20, min_steps=200, max_steps=1000,
      geo_samples=6400, geo_probes=6000, geo_seed=0))
  return config


READINGS = {
    "detach_input": ({"lsmtl.detach_input": True}, False),
    "warmup": ({"lsmtl.warmup_steps": 200}, False),
    "relation_lr": ({"lsmtl.relation_lr_scale": 10.0}, False),
    "lsr_head": ({"model.head_init": "lsr"}, True),
    "target_input": ({"lsmtl.relation_input": "target"}, False),
    "hidden": ({"lsmtl.relation_on": "hidden"}, False),
    "test_blend": ({"lsmtl.test_blend": True}, False),
}


def _geo_dir(config, workdir):
  return os.path.join(workdir, "data", "geo_shaped")


def prepare(config, workdir):
  """The synthetic compendium (generated once into the cache, before runs start
  side by side), and the GEO-shaped one: a GCTx with generated D-GEX-style maps,
  prepared as configs/prepare/geo.py prepares GEO (written once, then reused)."""
  if "synthetic" in config.study.datasets:
    from lsmtl_jax import config_lib  # pylint: disable=g-import-not-at-top
    from lsmtl_jax.data import sources  # pylint: disable=g-import-not-at-top
    synthetic = config_lib.resolve(config)
    synthetic.data.synthetic.enabled = True
    sources.load_dataset(synthetic)
  if "geo_shaped" not in config.study.datasets:
    return
  out = _geo_dir(config, workdir)
  if os.path.exists(os.path.join(out, "meta.json")):
    return
  from configs.prepare import geo  # pylint: disable=g-import-not-at-top
  from lsmtl_jax.data import prepare_lib  # pylint: disable=g-import-not-at-top
  from lsmtl_jax.data import synthetic_gctx  # pylint: disable=g-import-not-at-top
  s = config.study
  raw = os.path.join(workdir, "data", "raw")
  os.makedirs(raw, exist_ok=True)
  probes = synthetic_gctx.probe_ids(s.geo_probes, s.geo_seed)
  lm_map, tg_map = synthetic_gctx.write_maps(raw, probes, config.data.synthetic.num_landmarks,
                                             config.data.synthetic.num_targets, s.geo_seed)
  gctx = os.path.join(raw, "geo_shaped.gctx")
  if not os.path.exists(gctx):
    synthetic_gctx.generate_gctx(
        gctx, s.geo_samples, probes,
        synthetic_gctx.read_map_probes(lm_map) + synthetic_gctx.read_map_probes(tg_map),
        s.geo_seed)
  cfg = geo.get_config()
  cfg.input.path, cfg.output = gctx, out
  cfg.genes.landmark_map, cfg.genes.target_map = lm_map, tg_map
  cfg.dedup.num_clusters = 20
  prepare_lib.prepare(cfg)


def _steps(study, n):
  return int(min(study.max_steps, max(study.min_steps, study.epochs * n // 64)))


def _depth(config):
  return config.study.depth or config.model.depth


def _head_share(config, width):
  num_l, num_t = config.data.synthetic.num_landmarks, config.data.synthetic.num_targets
  depth = _depth(config)
  trunk = sum((num_l + i * width) * width + width for i in range(depth))
  head = (num_l + depth * width) * num_t + num_t
  return head / (trunk + head)


def _cell(config, dataset, n, width, workdir_data):
  data = ({"data.synthetic.enabled": True} if dataset == "synthetic" else
          {"data.synthetic.enabled": False, "data.path": workdir_data})
  steps = _steps(config.study, n)
  depth = {"model.depth": config.study.depth} if config.study.depth else {}
  return {**data, **depth, "data.max_train": n, "model.hidden": width, "train.num_steps": steps,
          "train.eval_every": max(50, steps // 10), "train.checkpoint_every": steps}


def get_runs(config, workdir=None):
  s = config.study
  geo = _geo_dir(config, workdir or "runs/regimes")
  runs = []
  for dataset in s.datasets:
    for n in s.n_train:
      for width in s.widths:
        readings = ["default"] + (list(s.readings) if width == s.reading_width
                                  and dataset in s.reading_datasets
                                  and (not s.reading_n_train or n in s.reading_n_train)
                                  else [])
        for reading in readings:
          extra, both_arms = READINGS.get(reading, ({}, False))
          base = {**_cell(config, dataset, n, width, geo), **extra}
          coords = {"dataset": dataset, "n_train": n, "width": width, "reading": reading,
                    "head_share": _head_share(config, width)}
          cell = f"{dataset}-{n}-w{width}" + (f"-d{s.depth}" if s.depth else "")
          lam0 = f"{cell}-{reading if both_arms else 'default'}-lam0"
          lsmtl_tune = {"search": [{"lsmtl.lam": lam} for lam in s.lam_values],
                        "seeds": s.seeds}
          if s.lsmtl_on_lam0_choice:
            lsmtl_tune["on_top_of"] = lam0
          if reading == "default" or both_arms:
            runs.append({"method": "densenet", "overrides": base, "name": lam0,
                         "figures": {"regime": {**coords, "arm": "lam0"}},
                         "tune": {"search": [{"model.dropout": d} for d in s.dropout_values],
                                  "seeds": s.seeds}})
          if reading == "default" and not s.default_lsmtl:
            continue
          runs.append({"method": "deep_lsmtl", "overrides": base,
                       "name": f"{cell}-{reading}-lsmtl",
                       "figures": {"regime": {**coords, "arm": "lsmtl"}},
                       "tune": lsmtl_tune})
  return runs
