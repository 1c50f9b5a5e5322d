"""The training core: sharded step == single-device step, checkpoints across device counts,
round trips, keep-last-K, corrupt checkpoints, the lr schedule, lagged metrics, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs
import models
from common.errors import UserError
from training import checkpoint, metrics, sharding, state as state_lib, step as step_lib

B, L, V = 8, 64, 64


class TinyLM(nn.Module):
  """A one-block LM with logical axis names and dropout, for the cheap tests (fast compile)."""
  width: int = 16

  @nn.compact
  def __call__(self, inputs_BxL: jax.Array, deterministic: bool) -> jax.Array:
    init = nn.initializers.normal(0.02)
    embed = self.param("embed", nn.with_logical_partitioning(init, ("vocab", "embed")),
                       (V, self.width))
    x_BxLxD = embed[inputs_BxL]
    h_BxLxF = nn.Dense(4 * self.width, kernel_init=nn.with_logical_partitioning(
        init, ("embed", "mlp")))(nn.LayerNorm()(x_BxLxD))
    h_BxLxF = nn.Dropout(0.1)(nn.gelu(h_BxLxF), deterministic=deterministic)
    x_BxLxD = x_BxLxD + nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(
        init, ("mlp", "embed")))(h_BxLxF)
    return nn.LayerNorm()(x_BxLxD) @ embed.T


def tiny_init(model_config, rng, batch):
  return nn.unbox(TinyLM().init(rng, batch["inputs"], deterministic=True)["params"])


def tiny_axes(model_config, batch):
  abstract = jax.eval_shape(lambda rng, x: TinyLM().init(rng, x, deterministic=True),
                            jax.random.key(0), batch["inputs"])
  return nn.get_partition_spec(abstract["params"])


def tiny_loss(params, batch, rng):
  logits_BxLxV = TinyLM().apply({"params": params}, batch["inputs"], deterministic=False,
                                rngs={"dropout": rng})
  nll_sum = -jnp.sum(models.token_log_probs(logits_BxLxV, batch["targets"]) * batch["weights"])
  tokens = jnp.sum(batch["weights"])
  return nll_sum / tokens, {"nll_sum": nll_sum, "tokens": tokens}


TINY = {"init_fn": tiny_init, "axes_fn": tiny_axes}


def make_config(name: str = "tiny_transformer", **train) -> ml_collections.ConfigDict:
  cfg = configs.get_config(name)
  cfg.model.dropout = 0.1  # the step's rng must be a pure function of the state
  cfg.train.update({"steps": 10, "warmup_steps": 2, **train})
  return cfg


def make_batch(seed: int, cfg: ml_collections.ConfigDict | None = None) -> dict[str, np.ndarray]:
  """B x L tokens of TinyLM's vocabulary, or of `cfg`'s model plus RETRO neighbours."""
  rng = np.random.default_rng(seed)
  vocab = V if cfg is None else cfg.model.vocab_size
  tokens = rng.integers(1, vocab, (B, L + 1)).astype(np.int32)
  weights = np.ones((B, L), np.float32)
  weights[0, -3:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  if cfg is not None and cfg.model.name == "retro":
    shape = (B, L // cfg.model.chunk_size, cfg.model.num_neighbours, cfg.model.neighbour_len)
    batch["neighbours"] = rng.integers(0, vocab, shape).astype(np.int32)
  return batch


def run_steps(cfg, mesh, real_model: bool, num_steps: int = 2):
  """A fresh state on `mesh` after `num_steps` steps: (state, shardings, last metrics)."""
  batch_cfg, fns = (cfg, {}) if real_model else (None, TINY)
  loss_fn = models.make_loss_fn(cfg.model) if real_model else tiny_loss
  state, shardings = state_lib.create_train_state(cfg, jax.random.PRNGKey(0),
                                                  make_batch(0, batch_cfg), mesh, **fns)
  train_step = step_lib.make_train_step(cfg, loss_fn, shardings, mesh)
  for i in range(num_steps):
    state, m = train_step(state, sharding.shard_batch(make_batch(i, batch_cfg), mesh))
  return state, shardings, metrics.to_host(m)


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _max_err(got, ref) -> float:
  """Largest |got - ref| / (1 + |ref|): absolute error for small values, relative for large."""
  return max(float(np.max(np.abs(np.asarray(x) - y) / (1.0 + np.abs(y))))
             for x, y in zip(jax.tree.leaves(got), map(np.asarray, jax.tree.leaves(ref)),
                             strict=True))


def _eight_devices(workdir: str) -> dict:
  """Runs in a subprocess with 8 fake CPU devices: sharded vs single-device steps."""
  assert jax.device_count() == 8
  one_device = sharding.make_mesh(devices=jax.devices()[:1])
  out = {}
  for name, data, fsdp in (("tiny_lm", 8, 1), ("tiny_retro", 4, 2)):
    real = name != "tiny_lm"
    cfg = make_config("tiny_retro" if real else "tiny_transformer")
    ref, _, ref_m = run_steps(cfg, one_device, real)
    cfg.train.update(mesh_data=data, mesh_fsdp=fsdp)
    got, shardings, got_m = run_steps(cfg, sharding.make_mesh(cfg.train), real)
    out[f"{name} {data}x{fsdp}"] = {
        "state": _max_err(got, ref), "loss": _max_err(got_m["loss"], ref_m["loss"]),
        "fsdp_sharded": sum("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings)),
    }
  with checkpoint.Checkpoints(workdir) as ckpt:  # the RETRO state, FSDP-sharded over 4x2
    ckpt.save(2, got, {"config": cfg.to_json()})
  np.savez(Path(workdir) / "expected.npz", *jax.tree.leaves(jax.device_get(got)))
  return out


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eight")
  # Unoptimised XLA code compiles twice as fast; both sides of each comparison use it.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, str(workdir)], env=env, capture_output=True,
                        text=True, timeout=600, cwd=Path(__file__).parents[1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["tiny_lm 8x1", "tiny_retro 4x2"])
def test_sharded_step_equals_single_device(eight_device_run, layout):
  result = eight_device_run[1][layout]
  assert result["state"] < 1e-6 and result["loss"] < 1e-6, result
  assert (result["fsdp_sharded"] > 0) == layout.endswith("x2"), result  # params + Adam moments


def test_checkpoint_from_eight_devices_restores_on_one(eight_device_run):
  workdir = eight_device_run[0]
  saved = np.load(workdir / "expected.npz")
  expected = [saved[f"arr_{i}"] for i in range(len(saved.files))]
  assert json.loads(checkpoint.restore_meta(workdir)["config"])["name"] == "tiny_retro"
  cfg = make_config("tiny_retro")
  abstract = state_lib.abstract_train_state(cfg, make_batch(0, cfg), sharding.make_mesh())
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    restored, meta = ckpt.restore(None, abstract)
  assert meta["step"] == 2 and len(jax.devices()) == 1
  assert all(np.array_equal(e, np.asarray(r))
             for e, r in zip(expected, jax.tree.leaves(restored), strict=True))
  assert type(restored.opt_state) is type(abstract.opt_state)
  assert _max_diff(checkpoint.load_params(workdir), restored.params) == 0.0


def test_round_trip_bit_identical_and_state_donatable(tmp_path):
  cfg = make_config()
  mesh = sharding.make_mesh(cfg.train)
  state, shardings = state_lib.create_train_state(cfg, jax.random.PRNGKey(0), make_batch(0),
                                                  mesh, **TINY)
  before = jax.device_get(state)
  train_step = step_lib.make_train_step(cfg, tiny_loss, shardings, mesh)
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    assert ckpt.save(0, state, {"config": cfg.to_json()})
    state, _ = train_step(state, sharding.shard_batch(make_batch(5), mesh))  # donates it
    ckpt.wait_until_finished()
    restored, meta = ckpt.restore(0, state_lib.abstract_train_state(cfg, make_batch(0), mesh,
                                                                    **TINY))
  assert _max_diff(before, restored) == 0.0 and _max_diff(state.params, restored.params) > 0
  assert ml_collections.ConfigDict(json.loads(meta["config"])).train.steps == 10


def test_keep_last_k_and_interval(tmp_path):
  tree = {"w": jnp.arange(4.0)}
  with checkpoint.Checkpoints(tmp_path, every=2, keep=2) as ckpt:
    saved = [s for s in range(1, 8) if ckpt.save(s, tree, {})]
    assert ckpt.save(7, tree, {}, force=True) and not ckpt.save(6, tree, {}, force=True)
    ckpt.wait_until_finished()
    assert saved == [2, 4, 6] and ckpt.all_steps() == [6, 7]
    with pytest.raises(UserError, match="available steps: 6, 7"):
      ckpt.restore_meta(4)


def test_empty_and_corrupt_checkpoints_raise_user_error(tmp_path):
  with pytest.raises(UserError, match="no checkpoints"):
    checkpoint.restore_meta(tmp_path)
  with pytest.raises(UserError, match="no checkpoints"):
    checkpoint.load_params(tmp_path)
  tree = {"params": {"w": jnp.arange(1000.0)}}
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(3, tree, {})
  for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:10])  # truncate the array data
  abstract = {"params": {"w": jax.ShapeDtypeStruct(
      (1000,), jnp.float32, sharding=sharding.replicated(sharding.make_mesh()))}}
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    with pytest.raises(UserError, match="truncated") as info:
      ckpt.restore(3, abstract)
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="truncated"):
    checkpoint.load_params(tmp_path)


def test_lr_schedule_warmup_then_cosine():
  t = make_config(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1).train
  lr = np.asarray(jax.jit(state_lib.lr_schedule(t))(jnp.arange(101)))
  assert np.all(np.diff(lr[:10]) > 0) and lr[0] == pytest.approx(1e-4)
  assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
  assert np.all(np.diff(lr[10:]) < 0) and lr[100] == pytest.approx(1e-4)
  assert lr[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
  with pytest.raises(UserError, match="warmup_steps"):
    state_lib.lr_schedule(make_config(steps=5, warmup_steps=6).train)


def test_weight_decay_skips_vectors():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
  tx = state_lib.make_optimizer(make_config(weight_decay=0.5, learning_rate=0.1).train)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  assert float(updates["kernel"][0, 0]) < 0 and float(updates["bias"][0]) == 0.0


def test_mesh_shape_resolution():
  assert sharding.mesh_shape(-1, 2, 8) == (4, 2) and sharding.mesh_shape(2, -1, 8) == (2, 4)
  with pytest.raises(UserError, match="needs 6 devices"):
    sharding.mesh_shape(3, 2, 8)
  with pytest.raises(UserError, match="cannot be split"):
    sharding.mesh_shape(-1, 3, 8)


def test_multihost_detected_from_config_or_launcher(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  train = make_config().train
  assert not sharding.multihost_requested(train)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not sharding.multihost_requested(train)
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.multihost_requested(train)
  monkeypatch.delenv("SLURM_NTASKS")
  train.multihost = True
  assert sharding.multihost_requested(train)


def test_lagged_metrics_fetch_one_step_late():
  lagged = metrics.Lagged()
  assert lagged.push(1, {"loss": jnp.float32(3.0)}) is None
  assert lagged.push(2, {"loss": jnp.float32(2.0)}) == (1, {"loss": 3.0})
  assert lagged.flush() == (2, {"loss": 2.0}) and lagged.flush() is None


def test_metrics_writer_and_loss_plot(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    for s in (1, 2, 3):
      w.write(s, {"loss": 4.0 - s, "lr": 1e-3})
    w.write(3, {"loss": 2.5}, prefix="eval")
  with metrics.MetricsWriter(tmp_path, resume_step=2) as w:
    w.write(3, {"loss": 0.5})
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["train/loss"] == 0.5
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  metrics.write_loss_plot(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


if __name__ == "__main__":
  print(json.dumps(_eight_devices(sys.argv[1])))


def test_batch_sizes_are_checked_against_the_mesh_before_anything_runs():
  """An evaluation batch that does not split over the data-parallel devices is reported when
  training starts (not at the final evaluation): the check reads only the mesh's shape."""
  mesh = type("FakeMesh", (), {"shape": {"data": 4, "fsdp": 2}})()
  ok = configs.load("tiny_retro", ["data.batch_size=16", "eval.batch_size=8"])
  sharding.check_batch_sizes(ok, mesh)
  bad = configs.load("tiny_retro", ["data.batch_size=16", "eval.batch_size=6"])
  with pytest.raises(UserError, match=r"eval.batch_size=6 does not split over the 8 "
                                      r"data-parallel devices .* multiple of 8"):
    sharding.check_batch_sizes(bad, mesh)
  sharding.check_batch_sizes(bad, mesh, ("data.batch_size",))  # training batches alone: fine
