"""Stage 4, the audit: privacy attacks on a run's artifacts, the audit runner and its HTML report."""
