"""Helpers every layer shares: argument checks, strict JSON, the progress bar."""
