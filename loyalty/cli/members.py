"""``loyalty forget``: erase every copy of a member's data, then print the receipt."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from pydantic import ValidationError

from loyalty.bootstrap import build_forget_service
from loyalty.cli.common import echo_json, fail, load_settings, open_database, utc_text


def forget_cmd(
    user_id: Annotated[str, typer.Argument(help="the member to erase everywhere")],
    wait: Annotated[float, typer.Option(help="seconds to wait for completion")] = 120.0,
) -> None:
    """Forget a member: erase every copy of their data, then print the receipt."""
    from loyalty.adapters.lease_keys import FORGET_LEASE
    from loyalty.adapters.pipeline_store import ShardLeases
    from loyalty.application.commands.forget import ForgetRequestBody

    try:  # the API's command (POST /v1/forget-requests): the same user-id rule
        user_id = ForgetRequestBody.model_validate({"user_id": user_id}).user_id
    except ValidationError as exc:
        reason = exc.errors(include_url=False, include_input=False)[0]["msg"]
        raise fail(f"user id: {reason}", 2) from None
    settings = load_settings()
    db = open_database(settings)
    service = build_forget_service(db)
    request = service.request(user_id)
    leases = ShardLeases(db)
    deadline = time.monotonic() + wait
    while True:
        if leases.try_acquire(FORGET_LEASE):  # no worker is doing it: do it here
            service.run_pending()
            leases.release_all()
        found = service.status(request.request_id)
        if found is not None and found.status == "completed":
            break
        if time.monotonic() > deadline:
            db.dispose()
            raise fail(f"request {request.request_id} not completed yet; check it later", 1)
        time.sleep(0.5)
    db.dispose()
    receipt = {
        "request_id": found.request_id,
        "status": found.status,
        "requested_at": utc_text(found.requested_at),
        "completed_at": utc_text(found.completed_at) if found.completed_at else None,
        "erased": found.erased,
    }
    echo_json(receipt)
