"""Reports of a run: the metrics table in markdown, figures, and a self-contained HTML page per subject."""
