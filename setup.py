from setuptools import find_packages, setup

DAGSTER = "1.13.27"
DAGSTER_LIBRARIES = "0.29.27"

setup(
    name="sd-assets",
    version="0.1.0",
    description="Stable Diffusion image grids as Dagster assets: reproducible, resumable, searchable.",
    packages=find_packages(exclude=["sd_assets_tests*"]),
    package_data={"sd_assets": ["templates/*.j2"]},
    python_requires=">=3.11,<3.13",
    install_requires=[
        # The Dagster family moves together; unpinned, pip picks ancient dagster-aws/dagster-k8s.
        f"dagster=={DAGSTER}",
        f"dagster-webserver=={DAGSTER}",
        f"dagster-graphql=={DAGSTER}",
        f"dagster-aws=={DAGSTER_LIBRARIES}",
        f"dagster-k8s=={DAGSTER_LIBRARIES}",
        f"dagster-postgres=={DAGSTER_LIBRARIES}",
        # Pinned: a newer torch pulls a multi-GB CUDA build onto CPU machines.
        "torch==2.13.0",
        "diffusers>=0.42,<0.43",
        "transformers>=5,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        # hub.py is written against the 2.x API (HfApi.resolve_revision, httpx2 transport errors).
        "huggingface_hub>=2.4,<3",
        "pandas>=3",
        "pyarrow>=15",
        "Pillow>=10",
        "Jinja2>=3.1",
        "pydantic>=2.7",
        "PyYAML>=6",
        "boto3>=1.34",
        # GPU utilisation for the per-style profile; on machines without NVIDIA's driver it is unused.
        "nvidia-ml-py>=12",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "moto[server]>=5",
            "psycopg2-binary>=2.9",
        ],
    },
    entry_points={"console_scripts": ["sd-assets=sd_assets.cli:main"]},
)
