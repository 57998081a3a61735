"""Data contracts of alma-r: Parquet schemas, atomic validated I/O, input readers, the bundled sample."""
