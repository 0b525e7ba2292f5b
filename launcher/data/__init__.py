"""Data: preprocess raw text into webdataset shards (the shard format is defined there) and the train/valid loader."""
