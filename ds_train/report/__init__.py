"""Run reports: metrics.jsonl rendered to figures (`ds-train report`)."""
