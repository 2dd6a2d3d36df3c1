"""Loaders: every supported source format -> training.data.dataset.RawDataset."""
