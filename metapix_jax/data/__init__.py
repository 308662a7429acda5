"""Data: label maps, dataset layouts, input pipelines and the synthetic benchmark."""
