"""Reporting: tables and summaries of run files, the book's figures, the claims' verdicts."""
