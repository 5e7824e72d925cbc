"""rekbatch: run Amazon Rekognition over whole S3 buckets from a config file."""

__version__ = "0.1.0"
