"""The API's bodies as pydantic models: they write the OpenAPI schema (the handlers build plain dicts).

Kept in step with the server by tests/test_serve_schema.py, which runs schemathesis
(`--checks all`) against the running server.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every refusal: 400, 401, 403, 408, 413, 503 (and 415/422 before any file was read)."""

    model_config = ConfigDict(extra="allow")
    detail: str = Field(description="What went wrong, in words meant for the user")


class Row(BaseModel):
    """One file's result: the fields of `pneumoedge infer`'s JSONL rows (`path` is the uploaded name)."""

    path: str
    status: Literal["ok", "error"]
    label: Optional[str]
    probability: Optional[float]
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]]
    disagreement: Optional[float]
    threshold: Optional[float]
    provider: Optional[str]
    ood: Optional[bool] = Field(description="Unlike the model's training images (null: the model cannot tell)")
    ood_score: Optional[float]
    overlay: str = Field(description="With ?explain=1: the heatmap overlay as a PNG data URL; otherwise empty")
    error: str = Field(description="Why the file could not be classified (status error); otherwise empty")


class ModelRef(BaseModel):
    name: str
    sha256: list[str] = Field(description="First 12 hex digits of each member file's sha256")


class ExplainInfo(BaseModel):
    requested: bool
    available: bool
    note: str


class PredictResponse(BaseModel):
    """200: at least one file was classified; each file has its row, in the order sent."""

    request_id: str
    results: list[Row]
    model: ModelRef
    explain: ExplainInfo
    notice: str


class PredictFailure(ErrorBody):
    """415/422 when every file failed: `detail` says why, `results` has each file's row."""

    request_id: Optional[str] = None
    results: list[Row] = Field(default_factory=list)


class Member(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    source: str = Field(description="The member's file name (never a path on the server)")
    weight: float
    precision: str
    sha256: str


class ServerLimits(BaseModel):
    model_config = ConfigDict(extra="allow")
    max_upload_bytes: int
    max_files: int
    queue_limit: int
    auth: bool
    version: str


class ModelInfo(BaseModel):
    """What `pneumoedge info --json` says, plus checksums, provenance and the server's limits."""

    model_config = ConfigDict(extra="allow")
    name: str
    task: str
    labels: list[str]
    threshold: Optional[float]
    members: list[Member]
    provenance: dict
    synthetic: bool
    provenance_summary: str
    can_explain: bool
    explain_note: str
    notice: str
    server: ServerLimits


class Health(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    status: Literal["ready", "busy"]
    model: str
