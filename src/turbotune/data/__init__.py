"""Training data: file formats, chat templates, datasets and the packaged samples."""
