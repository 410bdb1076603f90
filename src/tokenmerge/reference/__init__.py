"""Trained reference models (procedural data, configs, fp16 weights, pipeline, training) and ``tokenmerge demo``.

The demo's fixed image set lives here, where both the demo and ``tokenmerge analyze --model reference-*`` read it.
"""

#: Captions of the demo images, cycled: image ``i`` is caption ``i % 8`` with seed ``i``.
PROMPTS = (
    "red circle on blue gradient",
    "yellow square on purple stripes",
    "white triangle on green plain",
    "blue ring on orange checks",
    "orange circle on black stripes",
    "green square on white gradient",
    "purple triangle on yellow checks",
    "black ring on red gradient",
)
#: Blocks every method merges on the small reference Flux: all but the first of each kind.
FLUX_BLOCKS = {"double": (1, None), "single": (1, None)}
