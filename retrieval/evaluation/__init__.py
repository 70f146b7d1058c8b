"""Held-out evaluation jobs on a cohort's test split: `generation` (generators against two
baselines), `retrieval` (pair and clinical retrieval, the diagnosis suggestion),
`suggestion` (its calibration), `held_out` (the split checks). Ranking metrics
themselves are `encoder.ranking`."""
