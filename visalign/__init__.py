"""visalign: align image and video generators with reward signals.

Importing the package loads no model, no optional dependency and touches no network (docs/extending.md#dependencies);
everything heavy is imported on first use.
"""

__version__ = "0.1.0"
