"""Sequence-level CPO ("Sequence-level Large Language Model Training with Contrastive Preference Optimization",
anonymous ACL submission): settings, synthetic negatives, losses, the trainer, the ranking signal, WiSE-FT and
the evaluation metrics, as plain functions of plain arguments."""
