"""The feed's event ids are a contract (the same id on every read and every way out,
across releases): the fast ``event_id`` must equal the ``uuid5`` it stands for."""

from __future__ import annotations

import random
import uuid

from loyalty.application.delivery.feed import EVENT_NAMESPACE, event_id, forgotten_event_id


def test_event_ids_are_the_uuid5_of_their_name() -> None:
    rnd = random.Random(5)
    for _ in range(5_000):
        position, version, part = (
            rnd.randrange(10**12),
            rnd.randrange(1, 10**6),
            rnd.choice([0, 0, 1, 2]),
        )
        member = str(uuid.UUID(int=rnd.getrandbits(128)))
        name = f"{position}:{member}:{version}" + (f":{part}" if part else "")
        assert event_id(position, member, version, part) == str(uuid.uuid5(EVENT_NAMESPACE, name))


def test_a_known_id_stays_what_integrators_stored() -> None:
    # fixed once: a change of the namespace or the name's layout changes every id
    member = "0b9f2a56-6d36-4a8e-9b43-2f9a0c1d7e55"
    assert event_id(1, member, 1) == "cf1da39c-3671-53eb-a184-6893662fdc64"
    assert event_id(1, member, 1) == str(uuid.uuid5(EVENT_NAMESPACE, f"1:{member}:1"))
    assert EVENT_NAMESPACE == uuid.uuid5(uuid.NAMESPACE_URL, "urn:loyalty:feed-event")
    assert forgotten_event_id("r1") == str(uuid.uuid5(EVENT_NAMESPACE, "forgotten:r1"))
