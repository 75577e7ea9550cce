"""The fdcore router: instance registry, health manager, selection, streaming proxy, metrics."""
