"""A seeded, deterministic world of clients that run the lock's protocol against the simulated server.

Every client runs the real operations of ``celery_dlock/protocol.py`` on real
``LockCore`` objects; this module is their driver, on a simulated clock with an event
queue instead of sockets and threads. Faults are drawn from the seed: network delays,
lost requests and lost replies (the caller then meets its deadline), lost or late
hand-over messages, client pauses shorter and longer than the lease, crashes, and
cancellations at any step. The same seed gives the same run, step for step.

Invariants are checked after every event (see :meth:`World.check`); a violation raises
:class:`Violation` with the seed and the trace.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_dlock import protocol
from celery_dlock.errors import DeadlineExceeded
from celery_dlock.inbox import Inbox, handover_token, inbox_channel
from celery_dlock.lease import LockCore
from celery_dlock.schedule import RenewalSchedule
from celery_dlock.scripts import EXTEND
from tests.sim.server import SimServer

PREFIX = "sim:"
NAME = "job"
LOCK_KEY = f"{PREFIX}{{{NAME}}}"


class Cancelled(BaseException):
    """Thrown into an operation, as asyncio's cancellation or a signal handler's exception is."""


class Violation(AssertionError):
    pass


class SimLock(LockCore):
    """A LockCore whose client is a world's client: the protocol needs nothing else of it."""

    _check_client = staticmethod(lambda client: client)

    def make_token(self) -> str:
        """From the world's seed, so a run replays exactly (the real token is os.urandom's)."""
        return f"{self.redis.world.rng.getrandbits(128):032x}"


@dataclass
class Faults:
    latency_ms: tuple[int, int] = (0, 3)
    lose_request: float = 0.0
    lose_reply: float = 0.0
    lose_message: float = 0.0
    message_delay_ms: tuple[int, int] = (0, 5)
    pause: float = 0.0  # chance that a holder pauses before releasing
    long_pause: float = 0.0  # ...and that the pause outlasts the lease
    crash: float = 0.0  # chance that a holder never releases (its process died)
    cancel: float = 0.0  # chance per step that the operation is interrupted there
    resend: float = 0.0  # chance that a reply is lost and the client's retry policy sends it again

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        pick = lambda p: p if rng.random() < 0.5 else 0.0  # noqa: E731
        return cls(
            latency_ms=(0, rng.choice([1, 3, 20, 200])),
            lose_request=pick(0.03),
            lose_reply=pick(0.03),
            lose_message=pick(0.2),
            message_delay_ms=(0, rng.choice([1, 30, 300])),
            pause=pick(0.3),
            long_pause=pick(0.3),
            crash=pick(0.1),
            cancel=pick(0.02),
            resend=pick(0.05),
        )


@dataclass(repr=False)
class Client:
    name: str
    world: World
    inbox: Inbox[Any] = field(init=False)
    waiting: dict[str, Task] = field(default_factory=dict)  # token -> the task sleeping for it
    unclaimed: set[str] = field(default_factory=set)  # hand-overs that came before the sleep
    crashed: bool = False
    paused_until: int = 0  # a pause of the whole process (GC, swap, SIGSTOP): its watchdog too
    watchdog: SimWatchdog = field(init=False)

    def __post_init__(self) -> None:
        self.inbox = Inbox(inbox_channel(PREFIX, self.name), None)
        self.inbox.live_generation = 0
        self.watchdog = SimWatchdog(self)

    def __repr__(self) -> str:  # named in the lock's errors: the same in every replay
        return f"<sim client {self.name}>"


class SimWatchdog:
    """The renewal watchdog of one client: the real RenewalSchedule, its batches sent as one
    request each; paused with its client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.schedule = RenewalSchedule()
        self._timer = 0
        self.drains: list[tuple[Task, SimLock]] = []  # release()s waiting for a renewal on the wire

    def plan(self) -> None:
        world = self.client.world
        if self.client.crashed:
            return
        if world.now_ms < self.client.paused_until:
            world.at(self.client.paused_until, self.plan)
            return
        plan = self.schedule.plan(world.now_ms / 1000.0)
        for lock in plan.lost:
            lock._notify_lost()
        for batch in plan.batches:
            world.send_batch(self, batch)
        self._timer += 1
        timer = self._timer
        world.at(int(plan.wake_at * 1000) + 1, lambda: timer == self._timer and self.plan())

    def completed(
        self, batch: Any, replies: list[Any] | None, error: BaseException | None, sent_at: float
    ) -> None:
        world = self.client.world
        for lock in self.schedule.complete(batch, replies, error, sent_at, world.now_ms / 1000.0):
            lock._notify_lost()
        for task, lock in list(self.drains):
            if not self.schedule.in_flight(lock):
                self.drains.remove((task, lock))
                world.wake(task, None)
        self.plan()


class Task:
    """One operation of one client in progress."""

    def __init__(
        self,
        world: World,
        client: Client,
        lock: SimLock,
        operation: protocol.Operation[Any],
        label: str,
        done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        self.world, self.client, self.operation, self.label, self.done = world, client, operation, label, done
        self.lock = lock
        # The caller's operations can be interrupted; a clean-up the protocol detached
        # runs to its end (interrupting it too would be a second fault in one place).
        self.cancellable = done is not None
        self.finished = False
        self.started = False
        self.pending: int | None = None  # the id of the step it waits on
        self.watching: str | None = None

    def resume(self, value: Any = None, error: BaseException | None = None) -> None:
        world = self.world
        while not self.finished:
            if self.client.crashed:
                self.finished = True
                return
            # An interruption lands where the operation waits on a step (a driver awaits or
            # blocks only there), never before its first step.
            started, self.started = self.started, True
            if started and error is None and self.cancellable and world.rng.random() < world.faults.cancel:
                error = Cancelled(f"{self.label} interrupted")
            try:
                finished, item = protocol.advance(self.operation, value, error)
            except BaseException as exc:  # the operation raised
                self._finish(None, exc)
                return
            if finished:
                self._finish(item, None)
                return
            value, error = None, None
            outcome = world.perform(self, item)
            if outcome is WAIT:
                return
            value, error = outcome

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self.finished = True
        if self.watching is not None:
            self.client.waiting.pop(self.watching, None)
        self.world.trace.append(f"{self.world.now_ms:>8} {self.label} -> {error!r}" if error else
                                f"{self.world.now_ms:>8} {self.label} -> {result!r}")  # fmt: skip
        if self.done is not None:
            self.done(result, error)


WAIT = object()  # a step whose result comes later


class World:
    def __init__(self, seed: int, clients: int, faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults if faults is not None else Faults.draw(self.rng)
        self.server = SimServer(now_ms=1_000_000)
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._sequence = 0
        self.trace: list[str] = []
        self.clients = [Client(f"c{i}", self) for i in range(clients)]
        self.holders: dict[str, SimLock] = {}  # client -> the lock it was told it holds
        self.highest_fence = 0
        self.lossy = bool(self.faults.lose_request or self.faults.lose_reply or self.faults.resend)
        self.release_sent: set[str] = set()  # tokens whose release (or clean-up) was sent
        self.free: list[tuple[int, int]] = []  # (from, to) ms: the lock key did not exist
        self.free_since: int | None = self.now_ms
        self.lock_expires: int | None = None

    # -- time ---------------------------------------------------------------------------

    @property
    def now_ms(self) -> int:
        return self.server.now_ms

    def at(self, when_ms: int, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (max(when_ms, self.now_ms), self._sequence, action))

    def run(self, until_ms: int) -> None:
        while self._events and self._events[0][0] <= until_ms:
            when, _, action = heapq.heappop(self._events)
            self.server.now_ms = when
            action()
            self.observe_lock()
            self.check()
        self.server.now_ms = max(self.server.now_ms, until_ms)
        self.observe_lock()
        self.check()

    def observe_lock(self) -> None:
        """Keep the intervals in which the lock key did not exist (from its expiry, or its
        deletion), for the no-lost-wake-up check."""
        key = LOCK_KEY.encode()
        expires = self.server.expires.get(key)  # read before an expired key is dropped
        if self.server.get(key) is not None:
            if self.free_since is not None:
                self.free.append((self.free_since, self.now_ms))
                self.free_since = None
            self.lock_expires = expires
        elif self.free_since is None:
            expired = self.lock_expires is not None and self.lock_expires <= self.now_ms
            self.free_since = self.lock_expires if expired and self.lock_expires is not None else self.now_ms
            self.lock_expires = None

    def free_intervals(self) -> list[tuple[int, int]]:
        current = [] if self.free_since is None else [(self.free_since, self.now_ms)]
        return self.free + current

    # -- performing a step ---------------------------------------------------------------

    def perform(self, task: Task, step: protocol.Step) -> Any:
        """A step's (value, error) now, or WAIT when its result comes from an event."""
        client = task.client
        if step is protocol.NOW:
            return self.now_ms / 1000.0, None
        if isinstance(step, (protocol.Call, protocol.RunScript, protocol.Command)):
            self.send(task, step)
            return WAIT
        if step is protocol.LISTEN:
            return client.inbox, None
        if isinstance(step, protocol.Watch):
            task.watching = step.token
            return None, None
        if isinstance(step, protocol.Sleep):
            token = task.watching
            if token is not None and token in client.unclaimed:
                client.unclaimed.discard(token)
                return None, None
            if token is not None:
                client.waiting[token] = task
            task.pending = wake_id = self._sequence + 1
            self.at(self.now_ms + int(step.seconds * 1000) + 1, lambda: self.wake(task, wake_id))
            return WAIT
        if isinstance(step, protocol.Detach):
            Task(self, client, task.lock, step.operation, f"{client.name} clean-up").resume()
            return None, None
        watchdog = client.watchdog
        now = self.now_ms / 1000.0
        if step is protocol.TRACK:
            watchdog.schedule.track(task.lock, now)
            watchdog.plan()
        elif step is protocol.RETIME:
            watchdog.schedule.retime(task.lock, now)
            watchdog.plan()
        elif isinstance(step, protocol.Untrack):
            watchdog.schedule.untrack(task.lock)
            if step.wait and watchdog.schedule.in_flight(task.lock):
                watchdog.drains.append((task, task.lock))
                task.pending = wake_id = self._sequence + 1
                self.at(self.now_ms + int(step.wait * 1000), lambda: self.wake(task, wake_id))
                return WAIT
        return None, None  # CheckServer

    def wake(self, task: Task, wake_id: int | None) -> None:
        if task.finished or (wake_id is not None and task.pending != wake_id):
            return
        task.pending = None
        if task.watching is not None:
            task.client.waiting.pop(task.watching, None)
        task.resume()

    def send(self, task: Task, step: Any) -> None:
        if isinstance(step, protocol.Call) and step.script is task.lock._release_script:
            self.release_sent.add(step.args[0])
        lo, hi = self.faults.latency_ms
        step_id = self._sequence + 1
        task.pending = step_id
        state = {"answered": False}
        if self.rng.random() >= self.faults.lose_request:
            if self.rng.random() < self.faults.resend:
                # redis-py's retry: the request ran, its reply was lost, the same bytes go again.
                self.at(self.now_ms + self.rng.randint(lo, hi), lambda: self.server_call(step))
                self.at(self.now_ms + self.rng.randint(lo, hi) + hi, self.deliver_published)
            self.at(
                self.now_ms + self.rng.randint(lo, hi) + hi, lambda: self.execute(task, step, step_id, state)
            )
        deadline_ms = int(step.deadline * 1000)
        self.at(deadline_ms + 1, lambda: self.deadline(task, step_id, state))

    def execute(self, task: Task, step: Any, step_id: int, state: dict[str, bool]) -> None:
        if task.client.crashed:
            return
        try:
            reply: Any = self.server_call(step)
        except Exception as exc:  # a script error: the reply is an error
            reply = exc
        self.deliver_published()
        if self.rng.random() < self.faults.lose_reply:
            return
        lo, hi = self.faults.latency_ms
        self.at(self.now_ms + self.rng.randint(lo, hi), lambda: self.reply(task, step, step_id, state, reply))

    def server_call(self, step: Any) -> Any:
        if isinstance(step, protocol.Call):
            head = step.script.evalsha
            numkeys = int(head[2])
            return self.server.evalsha(head[1], list(head[3 : 3 + numkeys]), list(step.args))
        if isinstance(step, protocol.RunScript):
            return self.server.evalsha(step.script.sha, step.keys, step.args)
        command, *args = step.command
        key = args[0].encode() if isinstance(args[0], str) else args[0]
        if command == "ZREM":
            return self.server.zrem(key, args[1])
        if command == "GET":
            return self.server.get(key)
        if command == "EXISTS":
            return int(self.server.get(key) is not None)
        raise AssertionError(f"unexpected command {step.command!r}")

    def reply(self, task: Task, step: Any, step_id: int, state: dict[str, bool], reply: Any) -> None:
        if task.client.crashed:
            return
        if state["answered"]:  # the deadline came first: a late reply
            late = getattr(step, "late", None)
            if late is not None and not isinstance(reply, Exception):
                Task(self, task.client, task.lock, late(reply), f"{task.client.name} late reply").resume()
            return
        state["answered"] = True
        if task.pending == step_id:
            task.pending = None
            task.resume(*((None, reply) if isinstance(reply, Exception) else (reply, None)))

    def deadline(self, task: Task, step_id: int, state: dict[str, bool]) -> None:
        if state["answered"] or task.pending != step_id:
            return
        state["answered"] = True
        task.pending = None
        task.resume(None, DeadlineExceeded("no reply before the deadline (simulated)"))

    def send_batch(self, watchdog: SimWatchdog, batch: Any) -> None:
        """One pipeline of renewals (EXTEND 'renew'), as the real watchdog sends it."""
        for _lock, token in batch.locks:
            if token in self.release_sent:
                self.fail(f"{watchdog.client.name} sent a renewal after the release of {token}")
        sent_at = self.now_ms / 1000.0
        state = {"answered": False}
        lo, hi = self.faults.latency_ms
        client = watchdog.client

        def execute() -> None:
            if client.crashed:
                return
            replies = [
                self.server.evalsha(
                    EXTEND.sha, [lock.keys.lock], [token, lock.options.timeout_ms, "renew", 0]
                )
                for lock, token in batch.locks
            ]
            if self.rng.random() < self.faults.lose_reply:
                return
            self.at(self.now_ms + self.rng.randint(lo, hi), lambda: answer(replies, None))

        def answer(replies: list[Any] | None, error: BaseException | None) -> None:
            if state["answered"] or client.crashed:
                return
            if self.now_ms < client.paused_until:  # the process reads it when it runs again
                self.at(client.paused_until, lambda: answer(replies, error))
                return
            state["answered"] = True
            watchdog.completed(batch, replies, error, sent_at)

        if self.rng.random() >= self.faults.lose_request:
            self.at(self.now_ms + self.rng.randint(lo, hi), execute)
        self.at(int(batch.deadline * 1000) + 1, lambda: answer(None, DeadlineExceeded("renewal: no reply")))

    def deliver_published(self) -> None:
        published, self.server.published = self.server.published, []
        for channel, payload in published:
            if self.rng.random() < self.faults.lose_message:
                self.trace.append(f"{self.now_ms:>8} message {payload!r} lost")
                continue
            lo, hi = self.faults.message_delay_ms
            self.at(self.now_ms + self.rng.randint(lo, hi), lambda c=channel, p=payload: self.message(c, p))

    def message(self, channel: bytes, payload: bytes) -> None:
        for client in self.clients:
            if client.inbox.channel.encode() == channel and not client.crashed:
                token = handover_token(payload.decode())
                task = client.waiting.get(token)
                if task is None:
                    client.unclaimed.add(token)
                else:
                    self.wake(task, None)

    # -- invariants ----------------------------------------------------------------------

    def believes(self, lock: SimLock) -> bool:
        """What ``lock.lost`` says, on the simulated clock: held, and trusted until now."""
        return lock.token is not None and not lock._lost and self.now_ms / 1000.0 < lock.trusted_until

    def check(self) -> None:
        believers = [name for name, lock in self.holders.items() if self.believes(lock)]
        if len(believers) > 1:
            trust = {
                name: (self.holders[name].fence, round(self.holders[name].trusted_until, 3))
                for name in believers
            }
            self.fail(f"two clients hold the lock at once: {believers} (fence, trusted until: {trust})")

    def granted(self, client: Client, lock: SimLock) -> None:
        """acquire() returned True: the client holds the lock from now on (until it is lost)."""
        fence = lock.fence
        assert fence is not None
        if self.believes(lock):
            if fence <= self.highest_fence:
                self.fail(f"{client.name} got fence {fence}, not above an earlier one ({self.highest_fence})")
            self.highest_fence = fence
        elif lock.token is not None:
            self.fail(f"{client.name}'s acquire returned a lock whose lease it cannot trust any more")
        self.holders[client.name] = lock
        self.check()

    def fail(self, what: str) -> None:
        raise Violation(f"seed {self.seed} ({self.faults}): {what}\n" + "\n".join(self.trace[-40:]))


def run_seed(seed: int, clients: int = 3, rounds: int = 4, acquire_op: Any = None) -> World:
    """One run: each client acquires (blocking, with a timeout, or a single try), holds a
    while, and releases, ``rounds`` times; then the leftovers are checked."""
    world = World(seed, clients)
    acquire_op = acquire_op or protocol.acquire
    rng = world.rng
    lease = rng.choice([0.2, 1.0, 3.0])
    ended: set[str] = set()

    def start_round(client: Client, left: int) -> None:
        if left == 0 or client.crashed:
            ended.add(client.name)
            return
        blocking = rng.random() < 0.8
        lock = SimLock(client, NAME, timeout=lease, retry_delay=rng.choice([0.05, 0.3]),
                       blocking_timeout=rng.choice([0.5, 3.0]), auto_renewal=rng.random() < 0.5,
                       prefix=PREFIX)  # fmt: skip
        started = world.now_ms

        def acquired(result: Any, error: BaseException | None) -> None:
            limit = (lock.options.blocking_timeout or 0) + 0.25 + 0.5 + lease + 0.1
            took = (world.now_ms - started) / 1000
            if took > limit:
                world.fail(f"{client.name}'s acquire took {took:.3f}s, more than {limit:.3f}s")
            if result is True:
                world.granted(client, lock)
                hold(client, lock, left)
                return
            if blocking and error is None and not world.lossy:
                no_lost_wake_up(lock, started)
            world.at(world.now_ms + rng.randint(0, 50), lambda: start_round(client, left - 1))

        Task(world, client, lock, acquire_op(lock, blocking), f"{client.name} acquire", acquired).resume()

    def no_lost_wake_up(lock: SimLock, started: int) -> None:
        """A waiter that gave up must not have slept through a free lock: it looks again at
        least every retry_delay, so a free spell longer than that and a round trip, inside
        its wait, would have been its."""
        round_trip = 2 * world.faults.latency_ms[1]  # its last reply's way back, the next request's there
        longest_ms = lock.options.retry_delay * 1000 + round_trip + 3
        until = started + (lock.options.blocking_timeout or 0) * 1000 - round_trip
        for start, end in world.free_intervals():
            if start >= started and end <= until and end - start > longest_ms:
                world.fail(
                    f"{lock.redis.name} gave up though the lock was free from {start} to {end} "
                    f"({end - start} ms, more than its retry_delay and a round trip)"
                )

    def hold(client: Client, lock: SimLock, left: int) -> None:
        """Hold a while (longer than the lease when renewed); maybe pause the whole process,
        shorter or longer than the lease; maybe extend part-way; then release (or crash)."""
        hold_ms = rng.randint(0, int(lease * (3000 if lock.options.auto_renewal else 500)))
        if rng.random() < world.faults.pause:
            longer = rng.random() < world.faults.long_pause  # than the lease: the lock is lost meanwhile
            pause_ms = (
                rng.randint(int(lease * 1000), int(lease * 3000))
                if longer
                else rng.randint(0, int(lease * 900))
            )
            client.paused_until = world.now_ms + pause_ms  # its watchdog stops too
            hold_ms = max(hold_ms, pause_ms)
        if rng.random() < world.faults.crash:
            world.at(world.now_ms + hold_ms, lambda: crash(client, lock))
            return
        if rng.random() < 0.3:
            first = rng.randint(
                max(0, client.paused_until - world.now_ms), max(hold_ms, client.paused_until - world.now_ms)
            )
            world.at(world.now_ms + first, lambda: extend(client, lock, left, max(0, hold_ms - first)))
            return
        world.at(world.now_ms + hold_ms, lambda: release(client, lock, left))

    def extend(client: Client, lock: SimLock, left: int, rest_ms: int) -> None:
        seconds, replace = rng.choice([lease * 0.3, lease, lease * 2]), rng.random() < 0.5

        def extended(result: Any, error: BaseException | None) -> None:
            world.at(world.now_ms + rest_ms, lambda: release(client, lock, left))

        Task(
            world, client, lock, protocol.extend(lock, seconds, replace), f"{client.name} extend", extended
        ).resume()

    def release(client: Client, lock: SimLock, left: int) -> None:
        world.holders.pop(client.name, None)  # calling release() ends its use of the lock

        def released(result: Any, error: BaseException | None) -> None:
            world.at(world.now_ms + rng.randint(0, 50), lambda: start_round(client, left - 1))

        Task(world, client, lock, protocol.release(lock, None), f"{client.name} release", released).resume()
        if rng.random() < world.faults.crash / 2:  # the process dies with its release on the wire
            world.at(world.now_ms + rng.randint(0, world.faults.latency_ms[1]), lambda: crash(client, lock))

    def crash(client: Client, lock: SimLock) -> None:
        client.crashed = True
        world.holders.pop(client.name, None)
        world.trace.append(f"{world.now_ms:>8} {client.name} crashed holding fence {lock.fence}")
        ended.add(client.name)

    for client in world.clients:
        world.at(world.now_ms + rng.randint(0, 20), lambda c=client: start_round(c, rounds))
    world.run(world.now_ms + 120_000)
    if len(ended) != len(world.clients):
        world.fail(f"only {sorted(ended)} of {len(world.clients)} clients ended")
    leftovers(world, lease)
    return world


def leftovers(world: World, lease: float) -> None:
    """After every client ended: no lock and (without lost requests or replies, which may
    leave a queue entry behind until it expires) no queue entry that nobody owns."""
    keys = SimLock(world.clients[0], NAME, prefix=PREFIX).keys
    world.run(world.now_ms + int(lease * 1000) + 1)
    if world.server.get(keys.lock.encode()) is not None:
        world.fail("the lock is still held after every client ended and its lease ran out")
    queue = world.server.zset(keys.waiters.encode())
    crashed = {c.inbox.channel for c in world.clients if c.crashed}
    stale = [m for m in queue if not any(m.decode().split(":", 1)[1].startswith(ch) for ch in crashed)]
    if stale and not world.lossy:
        world.fail(f"queue entries nobody owns: {stale}")
