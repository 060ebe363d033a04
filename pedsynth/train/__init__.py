"""The bundled retriever trainer and evaluator (the ``train-retriever`` flow's logic).

Modules: ``data`` (streaming shard datasets, augmentation), ``model`` (open_clip dual
encoder), ``losses`` (SDM, ID, CM-MoCo), ``text_aug`` (BSS, NAM), ``metrics``
(:func:`~pedsynth.train.metrics.rank_metrics`, re-ranking), ``loop`` (the trainer),
``ablation``. Nothing here imports Prefect.
"""
