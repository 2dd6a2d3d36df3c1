"""Loaders: every supported source format -> training.data.dataset.RawDataset."""

from training.data.amazon import load_amazon
from training.data.atomic import load_atomic
from training.data.canonical import load_canonical
from training.data.common import DataFormatError, UnknownFormatError
from training.data.dataset import LoadReport, PreparedDataset, RawDataset
from training.data.fetch import data_root, fetch_ml100k, resolve_source
from training.data.load import detect_format, load_dataset
from training.data.movielens import load_movielens
from training.data.yelp import load_yelp

__all__ = [
    "DataFormatError",
    "LoadReport",
    "PreparedDataset",
    "RawDataset",
    "UnknownFormatError",
    "data_root",
    "detect_format",
    "fetch_ml100k",
    "load_amazon",
    "load_atomic",
    "load_canonical",
    "load_dataset",
    "load_movielens",
    "load_yelp",
    "resolve_source",
]
