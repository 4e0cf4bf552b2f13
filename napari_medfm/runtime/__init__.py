"""Model runtime: registry, weights manager, devices. Imports torch lazily."""
