"""``/health``: healthy only when every replica really generates.

A busy replica proves itself by finishing decode steps; an idle one is asked for one
greedy token (an embedding checkpoint that cannot generate, for one embedding). Results
are cached briefly so a tight probe loop costs the engine nothing, and concurrent probes
share one check.
"""

from __future__ import annotations

import asyncio
import time

from fermi.server.pool import EnginePool, Replica

CACHE_S = 2.0
PROBE_TIMEOUT_S = 10.0


class HealthChecker:
    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self._checked_at = -1e9
        self._result: tuple[bool, list[str]] = (False, [])
        self._running: asyncio.Task[tuple[bool, list[str]]] | None = None

    async def check(self) -> tuple[bool, list[str]]:
        """(healthy, one status line per replica)."""
        if time.monotonic() - self._checked_at < CACHE_S:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._check_all())
        task = self._running
        try:
            # shield: one caller going away must not cancel the check the others wait on
            result = await asyncio.shield(task)
        finally:
            if task.done() and self._running is task:
                self._running = None
        return result

    async def _check_all(self) -> tuple[bool, list[str]]:
        lines = await asyncio.gather(*(self._check(r) for r in self.pool.replicas))
        ok = all(line.endswith(": ok") for line in lines)
        self._result = (ok, list(lines))
        self._checked_at = time.monotonic()
        return self._result

    async def _check(self, replica: Replica) -> str:
        name = f"replica {replica.index} ({replica.device})"
        stats = replica.engine.stats()
        if stats.running or stats.waiting:
            now = time.monotonic()
            if stats.stalled(now):
                return f"{name}: no step for {now - stats.last_step_at:.0f}s"
            return f"{name}: ok"
        try:
            error = await asyncio.wait_for(_one_token(replica), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"{name}: no token within {PROBE_TIMEOUT_S:.0f}s"
        except Exception as exc:  # a closed engine, a full queue: unhealthy, not a crash
            return f"{name}: {type(exc).__name__}: {exc}"
        return f"{name}: {error}" if error else f"{name}: ok"


async def _one_token(replica: Replica) -> str | None:
    """Generate one greedy token; the error text if the engine reported one."""
    engine = replica.engine
    if not engine.generates:
        await engine.aembed([0])  # raises what the engine reports
        return None
    request = engine.build_request(prompt_token_ids=[0], max_tokens=1, temperature=0.0)
    async for delta in engine.astream_request(request):
        if delta.error:
            return delta.error
        if delta.finish_reason is not None:
            break
    return None
