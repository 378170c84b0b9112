"""Reports of a run: the metrics tables (JSON, markdown), figures, and a self-contained HTML page per subject."""

from noder_monai.reporting.figures import save_montage
from noder_monai.reporting.html import HTMLReportHandler, subject_report
from noder_monai.reporting.tables import METRICS, comparison_table, markdown_table

__all__ = ["METRICS", "HTMLReportHandler", "comparison_table", "markdown_table", "save_montage", "subject_report"]
