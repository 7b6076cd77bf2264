"""Uploaded datasets as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)


class DatasetPublic(BaseModel):
    """An uploaded dataset, as stored (its arrays are not part of the answer)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description='Server-generated id: train on it with {"name": "uploaded", "id": ...}.')
    name: str = Field(description="The label given at upload.")
    sample_shape: list[int] = Field(description="One sample as the network sees it: [C, H, W] or [F].")
    num_classes: int = Field(description="K: the labels are 0..K-1, every class present.")
    num_samples: int = Field(description="Samples (the training split; val_split holds out its end).")
    dtype: Literal["uint8", "float32"] = Field(
        description="uint8: pixels, divided by 255 for training and served from [0, 1]; "
        "float32: features, used as they are."
    )
    sha256: str = Field(description="SHA-256 of the stored arrays (the server's safetensors encoding).")
    size_bytes: int = Field(description="Size of the stored arrays.")
    created_at: datetime = Field(description="When it was uploaded.")


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic] = Field(description="Uploaded datasets, newest first.")
    total: int = Field(description="Uploaded datasets in all.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Datasets skipped.")
