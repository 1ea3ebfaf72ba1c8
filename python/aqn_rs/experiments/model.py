"""The old path of the embedded-model resolver, which scan and the experiments both use and so
lives on the bottom floor as `aqn_rs.models`. This name is that same module object (not a copy
of its names), so `aqn_rs.experiments.model.X = ...` still patches what the resolver calls."""

import sys

from .. import models

sys.modules[__name__] = models
