"""Model jobs on cohorts: train and run the generator (`generation`), train the embedder,
embed a cohort and build its index (`embedding`)."""
