"""Trained reference models (procedural data, configs, fp16 weights, pipeline, training) and ``tokenmerge demo``.

The demo's fixed image set lives here, where both the demo and ``tokenmerge analyze --model reference-*`` read it.
"""

#: Captions of the demo images, cycled: image ``i`` is caption ``i % 8`` with seed ``i``.
PROMPTS = (
    "red circle and blue square on green stripes",
    "yellow triangle and white circle and purple square on blue noise",
    "green square and red triangle on yellow checks",
    "blue circle and yellow square and red triangle on white gradient",
    "purple triangle and green circle on red noise",
    "white square and blue triangle and green circle on purple stripes",
    "yellow circle and purple triangle on green gradient",
    "red square and white triangle and blue circle on yellow checks",
)
