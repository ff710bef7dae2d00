"""Domain code: plain Python (no Dagster) for grids, keys, images, stores, galleries and catalogs."""
