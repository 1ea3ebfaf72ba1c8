"""The research plan's runs (docs/guides/EXPERIMENTS.md) as presets, one engine per machine kind.

* `presets`: the declarative preset files (`aqn_rs/presets/*.yaml`), loaded and validated.
* `data`: GSM8K-format jsonl, and a built-in arithmetic word-problem generator with a fixed
  train/test split (the embedded default's task).
* `reward`: verl's GSM8K scorer (strict, flexible, format score), re-implemented exactly.
* `local`: the single-machine engine (TRL's GRPOTrainer) with the package's hooks and AQN.
* `outputs`: `runs/<name>/{config.yaml,metrics.jsonl,summary.json,curves.png}`, the collapse
  verdict, `compare` and `sweep` tables.
* `local_launch`: a local run's checks, resolved config and launch (`prepare`, `execute`).
* `verl_engine`: the same runs on verl (Ray, FSDP, vLLM) with the aqn_rs plugin.
* `cli`: `python -m aqn_rs.experiments.cli`, the old path of `aqn-rs run | sweep | compare`
  (the command line itself is aqn_rs.cli.run, on the floor above this package).

Everything heavy (torch, transformers, trl, peft) is imported inside the functions that need it.
"""

from .errors import ExperimentError

__all__ = ["ExperimentError"]
