"""Evaluation as a library: what ``trainer/sample.py`` and ``trainer/evaluate.py`` (thin scripts) and the
training loop's periodic evaluation are made of.

- ``inference``: a run's export → config, UNet, metadata; sampling images from it; CLI plumbing
- ``parts``: resumable work cut into parts of fixed content, dealt over ranks
- ``sampling``: distributed, resumable image sampling (``trainer/sample.py``)
- ``bpd``: distributed, resumable bits/dim of a split (``trainer/evaluate.py bpd``)
- ``scoring``: reference statistics of a dataset and the quality of samples against them
  (``trainer/evaluate.py stats|quality``)
- ``quality``: FID, sFID, IS, precision/recall, KID math; ``features``: the feature networks
- ``periodic``: the cheap quality signal logged during training (``train.eval_every``)
"""
