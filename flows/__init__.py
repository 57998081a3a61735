"""Prefect flows of alma-r."""
