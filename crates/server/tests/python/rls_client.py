"""End-to-end checks of ratelimit-server with a client this project did not write.

The gRPC client is the one generated from Envoy's own protos (PyPI `xds-protos`, over
`grpcio`); `/json`, `/healthcheck` and `/metrics` are read with the standard library.

Run by crates/server/tests/python_client.rs, which starts the server on a copy of
crates/server/tests/configs/ (memory, then Redis) and passes:

    python rls_client.py --grpc HOST:PORT --http HOST:PORT --config-dir DIR

Exits non-zero, naming the failed check, on the first failure. Nothing here depends on timing
except reload polling, which waits up to 30 s.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
UNIT = rls_pb2.RateLimitResponse.RateLimit
DAY_SECONDS = 86_400


def descriptor(*entries, hits=None):
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


class Client:
    def __init__(self, grpc_addr, http_addr):
        self.channel = grpc.insecure_channel(grpc_addr)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.http = f"http://{http_addr}"

    def ask(self, domain, *descriptors, hits_addend=0):
        request = rls_pb2.RateLimitRequest(
            domain=domain, descriptors=list(descriptors), hits_addend=hits_addend
        )
        return self.stub.ShouldRateLimit(request, timeout=10)

    def get(self, path):
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def post_json(self, body):
        request = urllib.request.Request(
            self.http + "/json",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def seconds(duration):
    return duration.seconds + duration.nanos / 1e9


def unique(prefix):
    """A value no other run used (Redis may be shared across runs)."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def test_messaging_all_or_nothing(c):
    number = unique("206")
    marketing = descriptor(("message_type", "marketing"), ("to_number", number))
    per_number = descriptor(("to_number", number))
    for i in range(5):
        r = c.ask("messaging", marketing, per_number)
        check(r.overall_code == OK, f"marketing message {i + 1} of 5 allowed: {r}")
        s0, s1 = r.statuses
        check(s0.code == OK and s1.code == OK, f"both descriptors OK: {r}")
        check(s0.current_limit.requests_per_unit == 5, f"limit 5: {s0}")
        check(s0.current_limit.unit == UNIT.DAY, f"unit DAY: {s0}")
        check(s0.limit_remaining == 4 - i, f"remaining {4 - i}: {s0}")
        check(s1.current_limit.requests_per_unit == 100, f"limit 100: {s1}")
        check(s1.limit_remaining == 99 - i, f"remaining {99 - i}: {s1}")
        # Time until the bucket is full again: (i + 1) tokens of one day / 5 each, rounded up
        # to whole tokens; it only shrinks while the test runs.
        full = (i + 1) * DAY_SECONDS / 5
        check(full - 60 < seconds(s0.duration_until_reset) <= full, f"until full ~{full}: {s0}")
    r = c.ask("messaging", marketing, per_number)
    check(r.overall_code == OVER_LIMIT, f"sixth marketing message refused: {r}")
    s0, s1 = r.statuses
    check(s0.code == OVER_LIMIT and s0.limit_remaining == 0, f"marketing limit refuses: {s0}")
    # One token comes back every day / 5 = 17280 s; a few have passed since the first.
    check(17_000 < seconds(s0.duration_until_reset) <= 17_280, f"retry in ~17280 s: {s0}")
    check(s1.code == OK, f"the per-number limit had its token: {s1}")
    check(s1.limit_remaining == 95, f"and reports 95 left: {s1}")
    # All or nothing: the refused request took nothing from the per-number bucket.
    r = c.ask("messaging", per_number)
    check(r.overall_code == OK and r.statuses[0].limit_remaining == 94,
          f"refused request took nothing from the other descriptor: {r}")
    # Another number has its own buckets.
    r = c.ask("messaging", descriptor(("message_type", "marketing"), ("to_number", unique("206"))))
    check(r.statuses[0].limit_remaining == 4, f"another number, another bucket: {r}")


def test_blacklist_and_per_ip(c):
    r = c.ask("edge_proxy_per_ip", descriptor(("remote_address", "50.0.0.5")))
    check(r.overall_code == OVER_LIMIT, f"black-listed IP refused: {r}")
    s = r.statuses[0]
    check(s.current_limit.requests_per_unit == 0 and s.current_limit.unit == UNIT.HOUR, f"{s}")
    ip = unique("10.0.0")
    ip_descriptor = descriptor(("remote_address", ip))
    # A refused request (blacklisted descriptor alongside) takes nothing from the IP's bucket.
    r = c.ask("edge_proxy_per_ip", ip_descriptor, descriptor(("remote_address", "50.0.0.5")))
    check(r.overall_code == OVER_LIMIT, f"{r}")
    check(r.statuses[0].code == OK and r.statuses[0].limit_remaining == 10, f"untouched: {r}")
    for i in range(10):
        r = c.ask("edge_proxy_per_ip", ip_descriptor)
        check(r.overall_code == OK, f"request {i + 1} of 10 from {ip}: {r}")
    r = c.ask("edge_proxy_per_ip", ip_descriptor)
    check(r.overall_code == OVER_LIMIT, f"eleventh refused: {r}")


def test_unlimited_and_unknown(c):
    r = c.ask("internal", descriptor(("ldap", "x")), descriptor(("azure", unique("a"))),
              descriptor(("nothing", "here")))
    check(r.overall_code == OK, f"{r}")
    ldap, azure, nothing = r.statuses
    check(ldap.code == OK and ldap.limit_remaining == 4294967295, f"unlimited: {ldap}")
    check(not ldap.HasField("current_limit"), f"unlimited has no current limit: {ldap}")
    check(azure.current_limit.requests_per_unit == 100 and azure.current_limit.unit == UNIT.MINUTE,
          f"{azure}")
    check(azure.limit_remaining == 99, f"{azure}")
    check(nothing.code == OK and not nothing.HasField("current_limit"), f"no match: {nothing}")
    r = c.ask("no-such-domain", descriptor(("k", "v")))
    check(r.overall_code == OK and r.statuses[0].code == OK, f"unknown domain: {r}")


def test_shadow_mode(c):
    service = unique("svc")
    user_a = descriptor(("service", service), ("user", "user-a"))
    for i in range(15):
        r = c.ask("example6", user_a)
        check(r.overall_code == OK, f"shadow mode never refuses ({i + 1}): {r}")
        check(r.statuses[0].current_limit.requests_per_unit == 10, f"{r}")
    status, metrics = c.get("/metrics")
    check(status == 200, "metrics served")
    check('ratelimit_server_shadow_refusals_total{domain="example6"' in metrics,
          "shadow refusals counted in /metrics")
    user_b = descriptor(("service", service), ("user", "user-b"))
    # A shadow refusal alongside does not stop the real limit from counting.
    for i in range(20):
        r = c.ask("example6", user_b, user_a)
        check(r.overall_code == OK, f"user-b request {i + 1} of 20: {r}")
        check(r.statuses[0].limit_remaining == 19 - i, f"user-b counted: {r}")
    r = c.ask("example6", user_b)
    check(r.overall_code == OVER_LIMIT, f"user-b limited at 20: {r}")


def test_replaces(c):
    # The README's values (each run has its own key prefix, so runs do not share buckets).
    d1 = descriptor(("key_1", "value_1"), ("user", "bkthomps"))
    d2 = descriptor(("key_2", "value_2"), ("user", "bkthomps"))
    d1_read = descriptor(("key_1", "value_1"), ("user", "bkthomps"), hits=0)
    before = c.ask("example7", d1_read)
    check(before.statuses[0].current_limit.name == "specific_limit"
          and before.statuses[0].current_limit.requests_per_unit == 5,
          f"the named limit alone applies, with its name: {before}")
    r = c.ask("example7", d1, d2)
    s1, s2 = r.statuses
    check(s1.code == OK and not s1.HasField("current_limit"), f"replaced limit not applied: {r}")
    check(s2.current_limit.requests_per_unit == 10, f"replacing limit applies: {r}")
    after = c.ask("example7", d1_read)
    check(after.statuses[0].limit_remaining == before.statuses[0].limit_remaining,
          f"replaced limit was not counted: before {before} after {after}")


def test_wildcards(c):
    a = c.ask("example9", descriptor(("key1", unique("value"))))
    check(a.statuses[0].current_limit.requests_per_unit == 20 and a.statuses[0].limit_remaining == 19,
          f"prefix wildcard: {a}")
    b = c.ask("example9", descriptor(("key1", unique("value"))))
    check(b.statuses[0].limit_remaining == 19, f"each value its own bucket: {b}")
    r = c.ask("example9", descriptor(("key1", "valu")))
    check(not r.statuses[0].HasField("current_limit"), f"no match without the prefix: {r}")
    r = c.ask("example9", descriptor(("path", "/api/123/action")))
    check(r.statuses[0].current_limit.requests_per_unit == 20, f"middle wildcard: {r}")
    r = c.ask("example9", descriptor(("path", "/api/123/other")))
    check(not r.statuses[0].HasField("current_limit"), f"middle wildcard mismatch: {r}")
    first = c.ask("example9", descriptor(("files", "files/" + unique("a"))))
    second = c.ask("example9", descriptor(("files", "files/" + unique("b"))))
    check(second.statuses[0].limit_remaining == first.statuses[0].limit_remaining - 1,
          f"share_threshold: one bucket: {first} {second}")


def test_hits_addend(c):
    entries = (("message_type", "marketing"), ("to_number", unique("hits")))
    r = c.ask("messaging", descriptor(*entries), hits_addend=3)
    check(r.overall_code == OK and r.statuses[0].limit_remaining == 2, f"request hits_addend 3: {r}")
    for _ in range(2):
        r = c.ask("messaging", descriptor(*entries, hits=0))
        check(r.overall_code == OK and r.statuses[0].limit_remaining == 2,
              f"descriptor hits_addend 0 only reads: {r}")
    r = c.ask("messaging", descriptor(*entries, hits=2), hits_addend=1)
    check(r.overall_code == OK and r.statuses[0].limit_remaining == 0,
          f"descriptor hits_addend 2 overrides the request's 1: {r}")
    r = c.ask("messaging", descriptor(*entries), hits_addend=6)
    check(r.overall_code == OVER_LIMIT, f"more hits than the bucket holds: {r}")
    check(not r.statuses[0].HasField("duration_until_reset"), f"never passes: {r}")


def test_invalid_requests(c):
    for what, request in [
        ("no domain", rls_pb2.RateLimitRequest(descriptors=[descriptor(("k", "v"))])),
        ("no descriptors", rls_pb2.RateLimitRequest(domain="messaging")),
        ("too many descriptors",
         rls_pb2.RateLimitRequest(domain="messaging",
                                  descriptors=[descriptor(("k", "v"))] * 65)),
        ("too many entries",
         rls_pb2.RateLimitRequest(domain="messaging",
                                  descriptors=[descriptor(*[("k", "v")] * 17)])),
        ("value too long",
         rls_pb2.RateLimitRequest(domain="messaging",
                                  descriptors=[descriptor(("to_number", "9" * 5000))])),
    ]:
        try:
            c.stub.ShouldRateLimit(request, timeout=10)
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {err.code()}")
        else:
            raise AssertionError(f"{what}: accepted")
    # A long value within the bound is hashed into a key and works.
    r = c.ask("messaging", descriptor(("to_number", "9" * 3000)))
    check(r.overall_code == OK and r.statuses[0].limit_remaining == 99, f"long value: {r}")


def test_json(c):
    number = unique("json")
    body = {"domain": "messaging", "descriptors": [
        {"entries": [{"key": "message_type", "value": "marketing"},
                     {"key": "to_number", "value": number}]}], "hitsAddend": 5}
    status, answer = c.post_json(body)
    check(status == 200, f"/json OK: {status} {answer}")
    check(answer["overallCode"] == "OK", f"{answer}")
    s = answer["statuses"][0]
    check(s["code"] == "OK" and s["currentLimit"] == {"requestsPerUnit": 5, "unit": "DAY"}, f"{s}")
    check("limitRemaining" not in s, f"zero omitted: {s}")
    check(s["durationUntilReset"].endswith("s"), f"{s}")
    status, answer = c.post_json(body | {"hitsAddend": 1})
    check(status == 429 and answer["overallCode"] == "OVER_LIMIT", f"/json 429: {status} {answer}")
    status, _ = c.post_json({"domain": "messaging", "bogus": 1})
    check(status == 400, f"/json bad request: {status}")


def test_health_and_config(c):
    status, text = c.get("/healthcheck")
    check(status == 200 and text.startswith("OK"), f"/healthcheck: {status} {text}")
    status, text = c.get("/rlconfig")
    check(status == 200, f"/rlconfig: {status}")
    config = json.loads(text)
    domains = {f["config"]["domain"] for f in config["files"]}
    check({"messaging", "example6", "example7"} <= domains, f"/rlconfig lists the domains: {domains}")
    check(len(config["version"]) == 16, f"version: {config}")


def wait_until(what, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_reload(c, config_dir):
    path = os.path.join(config_dir, "mongo_cps.yaml")
    with open(path) as f:
        original = f.read()
    users = descriptor(("database", "users"), hits=0)

    def limit():
        return c.ask("mongo_cps", users).statuses[0].current_limit.requests_per_unit

    check(limit() == 500, "initial limit 500")
    # Replace the file atomically, as editors and config management do.
    with open(path + ".tmp", "w") as f:
        f.write(original.replace("500", "7", 1))
    os.replace(path + ".tmp", path)
    wait_until("the reload to 7", lambda: limit() == 7)
    # An invalid change is refused; the running configuration stays.
    with open(path, "w") as f:
        f.write("domain: mongo_cps\ndescriptors:\n  - key: database\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n")
    wait_until("/healthcheck to report the refused reload",
               lambda: "refused" in c.get("/healthcheck")[1])
    status, text = c.get("/healthcheck")
    check(status == 200 and "fortnight" in text and "mongo_cps.yaml" in text, f"{text}")
    check(limit() == 7, "the previous configuration stays")
    _, metrics = c.get("/metrics")
    check("ratelimit_server_config_error 1" in metrics, "config error metric set")
    check('ratelimit_server_config_loads_total{result="error"}' in metrics, "error load counted")
    with open(path, "w") as f:
        f.write(original)
    wait_until("the fixed configuration", lambda: limit() == 500)
    wait_until("/healthcheck to clear", lambda: c.get("/healthcheck")[1].strip() == "OK")
    _, metrics = c.get("/metrics")
    check("ratelimit_server_config_error 0" in metrics, "config error metric cleared")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--config-dir", required=True)
    args = parser.parse_args()
    c = Client(args.grpc, args.http)
    tests = [
        test_messaging_all_or_nothing,
        test_blacklist_and_per_ip,
        test_unlimited_and_unknown,
        test_shadow_mode,
        test_replaces,
        test_wildcards,
        test_hits_addend,
        test_invalid_requests,
        test_json,
        test_health_and_config,
    ]
    passed = 0
    for test in tests:
        test(c)
        passed += 1
        print(f"ok {test.__name__}", flush=True)
    test_reload(c, args.config_dir)
    passed += 1
    print("ok test_reload", flush=True)
    print(f"python client: {passed} passed, 0 failed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAILED: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
