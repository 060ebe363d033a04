"""A procedural pedestrian benchmark for text-based person retrieval.

Draws person-like figures whose attributes (hair, garments and their colours, shoes, bag, hat,
glasses) are sampled independently per identity, renders several varied images of each, writes
captions from the ground truth, and saves it all in the CUHK-PEDES layout. It is the demo input,
the test fixture and a benchmark where retrieval has to combine attributes to succeed.

Modules: ``vocabulary`` (attribute values), ``identity`` (sampling people), ``pose`` (viewpoint
and skeleton), ``canvas``/``figure`` (drawing), ``backdrop``/``camera`` (scene and photometry),
``captions`` (text) and ``dataset`` (files, splits, parallelism).
"""

from pedsynth.procedural.dataset import generate

__all__ = ["generate"]
