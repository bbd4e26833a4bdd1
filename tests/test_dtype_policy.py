"""The dtype policy of the compiled DINO and SwAV steps at model.dtype=bfloat16, read from the step's jaxpr:
parameters, optimiser state, centre and queue float32; the backbone and head matmuls bf16 with the 65,536-way (here
out_dim-way) logits accumulated into float32; every exp/log (softmaxes, loss, Sinkhorn) in float32."""
import jax
import jax.numpy as jnp
import pytest

from dino_jax import sharding, steps
from dino_jax import state as state_lib
from tests.helpers import recipe


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def _step_jaxpr(config):
  run = state_lib.build_run(config, steps_per_epoch=4, mesh=sharding.make_mesh(jax.devices()[:1]))
  c, b = config.crops, config.batch_size
  batch = {"global": jax.ShapeDtypeStruct((b, c.global_number, c.global_size, c.global_size, 3), jnp.uint8),
           "local": jax.ShapeDtypeStruct((b, c.local_number, c.local_size, c.local_size, 3), jnp.uint8)}
  strip = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
  state = strip(run.abstract)
  closed = jax.make_jaxpr(steps.make_train_step(run))(state, batch)
  return run, state, closed


@pytest.mark.parametrize("name,out_dim_key", [("quickstart", "out_dim"), ("swav_quickstart", "nmb_prototypes")])
def test_dtype_policy(name, out_dim_key):
  k = 97  # a width no other layer has
  config = recipe(name, **{"model.dtype": "bfloat16", "model.remat": "block", f"model.{out_dim_key}": k})
  run, state, closed = _step_jaxpr(config)
  # Parameters, optimiser state, teacher, centre / queue: float32 in and out.
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.teacher, state.method_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  eqns = list(_eqns(closed.jaxpr))
  dots = [e for e in eqns if e.primitive.name == "dot_general"]
  bf16 = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  # The big matmuls in bf16: the backbone's and the head's, forward and backward.
  assert len(bf16) >= 10
  # The logits [rows, K]: bf16 operands, float32 accumulation and result (DINO; SwAV's prototypes stay float32).
  logits = [e for e in dots if e.outvars[0].aval.shape[-1:] == (k,) and e.outvars[0].aval.ndim == 2 and
            e.outvars[0].aval.shape[0] % config.batch_size == 0]
  assert logits and all(e.outvars[0].aval.dtype == jnp.float32 for e in logits)
  if config.method == "dino":
    assert any(all(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e in logits)
  # Softmaxes, log-softmax, loss, Sinkhorn: every exp and log in float32. The one bf16 exp allowed is the exact GELU's
  # derivative (exp(-x^2/2)) on the MLP hidden activations, as autocast runs GELU in half precision too.
  hidden = {int(config.model.overrides["embed_dim"] * 4), config.model.get("head_hidden_dim", -1)}
  trans = [e for e in eqns if e.primitive.name in ("exp", "log", "log1p", "logistic")]
  low = [e for e in trans if e.invars[0].aval.dtype != jnp.float32]
  assert trans and len(low) < len(trans)
  assert all(e.primitive.name == "exp" and e.invars[0].aval.shape[-1] in hidden for e in low), \
      sorted({(e.primitive.name, str(e.invars[0].aval)) for e in low})
