"""Held-out evaluation jobs: generation and retrieval reports on a cohort's test split."""
