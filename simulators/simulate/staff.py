"""Top-ups at the service desk: a staff member's REST calls (CONTRACT.md section 3).

Residents pay lunch from a stored-value purse; in a real community they top it up at the
desk or in the app before it runs dry. The simulation does the same through the API with a
staff login, so a long run does not turn into a log of `insufficient_funds` refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx

from simulators.simulate.runner import TopUp

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def staff_topups(api: str, username: str, password: str) -> AsyncIterator[TopUp]:
    async with httpx.AsyncClient(base_url=api.rstrip("/"), timeout=30) as http:
        token: dict[str, str] = {}
        one_login = asyncio.Lock()  # concurrent top-ups share one login (logins are rate-limited)

        async def login() -> None:
            async with one_login:
                if token:
                    return
                answer = await http.post("/api/v1/auth/token",
                                         data={"username": username, "password": password})
                answer.raise_for_status()
                token["Authorization"] = f"Bearer {answer.json()['access_token']}"

        async def topup(resident_id: str, amount_cents: int, key: str) -> bool:
            """True when credited. Retried on a timeout or an expired login: the
            idempotency key makes a repeat credit the purse once."""
            for _ in range(3):
                try:
                    if not token:
                        await login()
                    answer = await http.post(
                        f"/api/v1/canteen/accounts/{resident_id}/topup", headers=token,
                        json={"amount_cents": amount_cents, "idempotency_key": key})
                except httpx.TimeoutException:
                    log.info("top-up for %s timed out; trying again", resident_id)
                    continue
                except httpx.HTTPError as exc:
                    log.warning("top-up for %s failed: %r", resident_id, exc)
                    return False
                if answer.status_code == 401:
                    token.pop("Authorization", None)  # expired: log in again
                    continue
                if answer.status_code >= 400:
                    log.warning("top-up for %s refused: %s %s", resident_id,
                                answer.status_code, answer.text[:200])
                return answer.status_code < 400
            log.warning("top-up for %s: no answer from %s", resident_id, api)
            return False

        yield topup
