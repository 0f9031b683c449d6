"""The right to be forgotten: erase a member everywhere (the API and the CLI)."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from loyalty.application.commands.fields import (
    UserIdentifier,
)


class ForgetRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserIdentifier = Field(description="the member to erase everywhere")
