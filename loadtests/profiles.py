"""Load profiles: the request mix and the user steps (ramp, hold, stop), from profiles.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_FILE = Path(__file__).resolve().parent / "profiles.yaml"
MAX_USERS = 64
MAX_TOTAL_S = 1800.0  # a load test is bounded in time: half an hour at most

Task = Literal[
    "query_extractive",
    "query_ensemble",
    "query_generative",
    "retrieve",
    "read",
    "generate_stream",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Strict):
    users: int = Field(..., ge=1, le=MAX_USERS)
    seconds: float = Field(..., gt=0, le=MAX_TOTAL_S)


class Profile(_Strict):
    description: str = ""
    steps: list[Step] = Field(..., min_length=1)
    spawn_rate: float = Field(2.0, gt=0, le=MAX_USERS)
    # Think time between one user's requests (uniform in [lo, hi]); 0 = closed loop.
    wait_s: tuple[float, float] = (0.0, 0.0)
    tasks: dict[Task, float] = Field(..., min_length=1)
    writes_per_min: float = Field(0.0, ge=0, le=600)
    max_new_tokens: int = Field(16, ge=1, le=512)
    top_k_retriever: int = Field(5, ge=1, le=50)
    request_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _bounded(self) -> Profile:
        if sum(s.seconds for s in self.steps) > MAX_TOTAL_S:
            raise ValueError(f"a profile runs at most {MAX_TOTAL_S:.0f} s in all")
        if any(w < 0 for w in self.tasks.values()) or not any(self.tasks.values()):
            raise ValueError("task weights must be >= 0 and not all 0")
        if not 0 <= self.wait_s[0] <= self.wait_s[1]:
            raise ValueError("wait_s must be [lo, hi] with 0 <= lo <= hi")
        return self

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    with open(path or PROFILES_FILE) as f:
        data = yaml.safe_load(f) or {}
    return {name: Profile.model_validate(p) for name, p in (data.get("profiles") or {}).items()}


def load_profile(name: str, path: str | Path | None = None) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ValueError(f"no profile {name!r} in {path or PROFILES_FILE}: {sorted(profiles)}")
    return profiles[name]
