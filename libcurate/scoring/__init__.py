"""Model scoring stages: ``score_clip`` (:mod:`.clip`), ``score_reward`` (:mod:`.reward`),
``score_length`` (:mod:`.length`); shared plumbing in :mod:`.common`. Scores are stored, never used to
drop samples here: thresholds belong to ``select``."""
