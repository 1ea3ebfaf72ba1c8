"""Integrations of aqn-rs with training frameworks, each imported on its own.

* `aqn_rs.integrations.verl`: the verl plugin (W4A16 fake quant of the FSDP actor, a
  fake-quantized weight sync into vLLM, AQN on the vLLM rollout model). It is loaded by verl
  itself: `actor_rollout_ref.model.external_lib=aqn_rs.integrations.verl` and
  `VERL_USE_EXTERNAL_MODULES=aqn_rs.integrations.verl` (docs/guides/VERL.md).

Nothing here is imported by `import aqn_rs`; verl, vLLM and torch load only inside the
integration that needs them.
"""

__all__ = ["verl"]
