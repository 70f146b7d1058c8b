"""Cohorts on disk: the catalog, media decoding and writing, ingestion, case info, the
paired training data, and the built-in retinal phantom."""
