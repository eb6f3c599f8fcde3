"""Sinks for what a command measured: the stat printer, the Parquet writer."""
