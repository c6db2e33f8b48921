"""Datasets: the on-disk store, the demo generator and the batch loaders."""
