"""Data: records on disk (ArrayRecord of tf.train.Example) -> Grain pipelines -> batches."""
