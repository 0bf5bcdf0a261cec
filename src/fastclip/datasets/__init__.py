"""Training and evaluation data: the synthetic shapes demo, CSV pairs, webdataset tar shards,
class-named image folders. Missing or corrupt images are skipped and counted, never fatal."""
from .csv_dataset import CsvDataset, DataError, collate_skipping, load_image
from .folder import ImageFolderDataset, read_classnames
from .shapes import COLOR_NAMES, HELD_OUT, SHAPES, ShapesDataset
from .webdataset import WebDataset, expand_urls

__all__ = ["ShapesDataset", "SHAPES", "COLOR_NAMES", "HELD_OUT", "CsvDataset", "DataError", "WebDataset", "expand_urls",
           "ImageFolderDataset", "read_classnames", "collate_skipping", "load_image"]
