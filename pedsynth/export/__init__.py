"""Exports of a finished build: the public datasets' layouts and RAR ranking data.

- :mod:`pedsynth.export.layouts`: ``pedsynth export OUT DIR --format cuhk-pedes|icfg-pedes|
  rstpreid`` writes the annotation file and ``imgs/`` each public dataset ships.
- :mod:`pedsynth.export.ranking`: ``pedsynth export-ranking OUT DIR`` writes instruction-tuning
  records (numbered contact sheet, prompt, answer order) from the memory's index.
- :mod:`pedsynth.export.target`: reading the build and preparing the export folder, shared by
  both.
"""
