#!/usr/bin/env python3
"""An independent check of digest latency: a plain NATS client (nats-py, not this project's
code) subscribes to AlarmDigest, publishes SendAlarmDigest at a steady rate through
JetStream (waiting for each PubAck, as a careful producer does), and times each request from
its own publish to its own digest's first part. Prints p50/p90/p99/max.

    python3 -m pip install nats-py
    python3 scripts/latency-probe.py --url nats://127.0.0.1:4222 --rate 5 --count 100

The users must exist or not, it does not matter: every request gets a digest ([] included).
"""
import argparse
import asyncio
import json
import time


async def main() -> None:
    import nats  # nats-py

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--rate", type=float, default=5.0, help="requests per second")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--request-subject", default="SendAlarmDigest")
    parser.add_argument("--digest-subject", default="AlarmDigest")
    args = parser.parse_args()

    nc = await nats.connect(args.url.split(","))
    js = nc.jetstream()
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    run = f"probe-{int(time.time())}"

    async def on_digest(msg) -> None:
        part = (msg.headers or {}).get("Alarm-Digest-Part", "1/1")
        if not part.startswith("1/"):
            return
        user = json.loads(msg.data).get("UserID")
        started = sent.pop(user, None)
        if started is not None:
            latencies.append(time.monotonic() - started)
            if len(latencies) == args.count:
                done.set()

    await nc.subscribe(args.digest_subject, cb=on_digest)
    await nc.flush()
    start = time.monotonic()
    for i in range(args.count):
        due = start + i / args.rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        user = f"{run}-{i}"
        sent[user] = time.monotonic()
        await js.publish(args.request_subject, json.dumps({"UserID": user}).encode())
    try:
        await asyncio.wait_for(done.wait(), timeout=30)
    except asyncio.TimeoutError:
        pass
    await nc.close()
    if not latencies:
        raise SystemExit("no digest arrived")
    latencies.sort()

    def at(q: float) -> float:
        return latencies[max(0, int(len(latencies) * q + 0.999999) - 1)] * 1000

    print(
        f"probe: {len(latencies)} of {args.count} answered at {args.rate:g}/s: "
        f"p50 {at(0.5):.2f} ms  p90 {at(0.9):.2f} ms  p99 {at(0.99):.2f} ms  max {latencies[-1] * 1000:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
