"""Real parallel clients against the real server (``loyalty serve``) on both backends."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from loyalty.adapters.event_store import event_store_env
from loyalty.application.accounts import Accounts, AwardCommand, Members
from loyalty.config import Settings
from loyalty.domain.ranks import RankLadder
from tests.e2e.live import create_key, serve, wait_for


def test_fifty_concurrent_spends_of_five_against_one_hundred(settings: Settings) -> None:
    url = settings.database_url
    with serve(url) as base:
        shop = {"Authorization": f"Bearer {create_key(url, 'shop', 'webshop')}"}
        ops = {"Authorization": f"Bearer {create_key(url, 'operator', 'ops')}"}
        seeded = httpx.post(
            f"{base}/v1/members/hot/adjustments",
            json={"adjustment_id": "seed", "currency": 100, "rank_points": 0, "reason": "seed"},
            headers=ops,
        )
        assert seeded.status_code == 200, seeded.text
        start = threading.Barrier(50)

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=base, headers=shop, timeout=60) as client:
                start.wait()
                return client.post("/v1/members/hot/spend", json={"order_id": f"o{i}", "amount": 5})

        with ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(one, range(50)))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(ok) == 20, [(r.status_code, r.text) for r in responses]
        assert {r.status_code for r in refused} == {409}
        assert {r.json()["code"] for r in refused} == {"insufficient_funds"}
        # every success saw a distinct balance: the spends were serialized, never negative
        assert sorted(r.json()["currency"] for r in ok) == list(range(0, 100, 5))
        member = httpx.get(f"{base}/v1/members/hot", headers=shop).json()
        assert member["currency"] == 0

        # the statement (a projection, run by the server) catches up: 20 spends, 1 credit
        # (and the new member's starting rank: counting entries, 21 came one spend early)
        def statement() -> Any:
            body = httpx.get(
                f"{base}/v1/members/hot/history", params={"limit": 200}, headers=shop
            ).json()
            spends = [e for e in body["entries"] if e["kind"] == "spend"]
            return body if len(spends) >= len(ok) else None

        entries = wait_for(statement)["entries"]
        assert sorted(e["ref"] for e in entries if e["kind"] == "spend") == sorted(
            r.json()["order_id"] for r in ok
        )
        assert sum(e["currency"] for e in entries) == 0
        board = httpx.get(f"{base}/v1/leaderboard", headers=shop).json()
        assert board["entries"][0]["user_id"] == "hot"


def test_concurrent_awards_and_spends_interleave_without_loss(settings: Settings) -> None:
    url = settings.database_url
    awards, award_size, spends, spend_size = 60, 3, 80, 2
    with serve(url) as base:
        shop = {"Authorization": f"Bearer {create_key(url, 'shop', 'webshop')}"}
        members = Members(env=event_store_env(settings))
        accounts = Accounts(members)
        ladder = RankLadder()
        accounts.award_many([AwardCommand("busy", "a-seed", 10, 1, 1, 1)], ladder)
        stop = threading.Event()

        def award_loop() -> None:
            for i in range(awards):
                accounts.award_many([AwardCommand("busy", f"a{i}", award_size, 1, 1, 1)], ladder)
                time.sleep(0.005)
            stop.set()

        def spender(worker: int) -> list[httpx.Response]:
            out = []
            with httpx.Client(base_url=base, headers=shop, timeout=60) as client:
                for j in range(spends // 8):
                    out.append(
                        client.post(
                            "/v1/members/busy/spend",
                            json={"order_id": f"s{worker}.{j}", "amount": spend_size},
                        )
                    )
            return out

        awarder = threading.Thread(target=award_loop)
        awarder.start()
        with ThreadPoolExecutor(8) as pool:
            results = [r for batch in pool.map(spender, range(8)) for r in batch]
        awarder.join()
        members.close()
        assert {r.status_code for r in results} <= {200, 409}
        succeeded = sum(1 for r in results if r.status_code == 200)
        assert all(
            r.json()["code"] == "insufficient_funds" for r in results if r.status_code == 409
        )
        assert succeeded > 0
        expected = 10 + awards * award_size - succeeded * spend_size
        member = httpx.get(f"{base}/v1/members/busy", headers=shop).json()
        assert member["currency"] == expected
        assert member["lifetime_currency"] == 10 + awards * award_size

        def statement() -> Any:
            body = httpx.get(
                f"{base}/v1/members/busy/history", params={"limit": 200}, headers=shop
            ).json()
            return body if len(body["entries"]) >= 1 + awards + succeeded else None

        entries = wait_for(statement)["entries"]
        assert sum(e["currency"] for e in entries) == expected
