"""The layer modules a plan's WRAP and INSERT surgeries build on torch, by the class of a surgery's
`layer`: each file of backends/torch/methods/ registers its own with `@builds(TheLayer)`."""

from twintune.backends.base import LayerRegistry

LAYERS = LayerRegistry()
builds = LAYERS.builds
