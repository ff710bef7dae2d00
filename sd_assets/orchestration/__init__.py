"""The Dagster layer: assets, resources and sensors, thin wrappers over sd_assets.domain."""
