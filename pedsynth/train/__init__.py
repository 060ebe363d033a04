"""The bundled retriever trainer and evaluator (the ``train-retriever`` flow's logic).

Modules: ``data`` (the shard index, image reads), ``datasets`` (training and gallery datasets,
the batch sampler, what training drew), ``transforms`` (evaluation preprocessing and training
augmentation), ``model`` (open_clip dual encoder), ``losses`` (SDM, ID, CM-MoCo), ``text_aug``
(BSS, NAM), ``optim`` (parameter groups, schedule), ``checkpoint`` (safetensors + JSON),
``evaluate`` and ``metrics`` (:func:`~pedsynth.train.metrics.rank_metrics`, re-ranking),
``loop`` (the trainer), ``ablation``. Nothing here imports Prefect.
"""
