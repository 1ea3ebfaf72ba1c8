"""The one error type of the experiment layer: its message is the one line the CLI prints.
Defined with the package's other errors (`aqn_rs.errors`), under the `AqnError` root."""

from ..errors import ExperimentError

__all__ = ["ExperimentError"]
