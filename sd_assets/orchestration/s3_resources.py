"""The artifact store on S3, its client from dagster-aws's ``S3Resource``.

A module of its own so that dagster-aws (and boto3 with it) loads only when the storage is an
s3:// URL: importing it costs a local run about half a second.
"""

import boto3
from botocore.handlers import disable_signing
from dagster_aws.s3 import S3Resource
from dagster_aws.utils import construct_boto_client_retry_config
from pydantic import Field

from sd_assets.domain.s3_store import CONNECT_TIMEOUT_SECONDS, client_config
from sd_assets.domain.store import ArtifactStore, open_store
from sd_assets.orchestration.resources import ArtifactStoreResource


class S3ClientResource(S3Resource):
    """dagster-aws's ``S3Resource``, its settings and their meaning, and a connect timeout (which
    ``S3Resource`` leaves at botocore's 60 s a try)."""

    connect_timeout: float = Field(
        default=CONNECT_TIMEOUT_SECONDS, description="Seconds to wait for a connection, on each try."
    )

    def get_client(self):
        session = boto3.session.Session(profile_name=self.profile_name)
        client = session.client(
            "s3", region_name=self.region_name, endpoint_url=self.endpoint_url, use_ssl=self.use_ssl,
            verify=self.verify, aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key, aws_session_token=self.aws_session_token,
            config=client_config(connect_timeout=self.connect_timeout).merge(
                construct_boto_client_retry_config(self.max_attempts)
            ),
        )  # fmt: skip
        if self.use_unsigned_session:
            client.meta.events.register("choose-signer.s3.*", disable_signing)
        return client


class S3ArtifactStoreResource(ArtifactStoreResource):
    """``ArtifactStoreResource`` for s3://bucket/prefix, with the S3 client configured by ``s3``."""

    s3: S3Resource

    def open(self) -> ArtifactStore:
        return open_store(self.url, s3_client=self.s3.get_client)
