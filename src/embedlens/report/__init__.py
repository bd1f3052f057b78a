"""The interactive HTML report: every visual token, layer by layer, in one offline file.

``write_report(run_dirs, out_path)`` reads the output folders of ``probe`` (single or multi-layer),
``classify``, ``stats``, ``eval``, ``align`` and ``inject-sweep`` and the anchors JSON of
``discover-anchors``, and writes one self-contained HTML file (data inline, no network request).
"""

from embedlens.report.page import ReportInfo, render_report, save_view, write_report
from embedlens.report.readers import KINDS, Section, read_section

__all__ = ["KINDS", "ReportInfo", "Section", "read_section", "render_report", "save_view", "write_report"]
