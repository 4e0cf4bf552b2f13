"""npe2 contributions (reader, writers, sample data): thin adapters over the library core."""
