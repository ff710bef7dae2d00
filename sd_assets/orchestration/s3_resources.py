"""The artifact store on S3, its client from dagster-aws's ``S3Resource``.

A module of its own so that dagster-aws (and boto3 with it) loads only when the storage is an
s3:// URL: importing it costs a local run about half a second.
"""

from dagster_aws.s3 import S3Resource

from sd_assets.domain.store import ArtifactStore, open_store
from sd_assets.orchestration.resources import ArtifactStoreResource


class S3ArtifactStoreResource(ArtifactStoreResource):
    """``ArtifactStoreResource`` for s3://bucket/prefix, with the S3 client configured by ``s3``."""

    s3: S3Resource

    def open(self) -> ArtifactStore:
        return open_store(self.url, s3_client=self.s3.get_client)
