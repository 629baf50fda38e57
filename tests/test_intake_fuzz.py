"""The server's intake against a malicious (authenticated) node: every bad reply is a rejection code and
a drop, `collect()` never raises, staged memory stays capped and the collection meets its deadline."""
import random
import time

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.federation.collect import collect
from server.federation.pool import LatentPool
from tests.scripted_grid import DATA, Node, ScriptedGrid, fed_config, no_dp, tiny_encoder

HONEST, EVIL = 11, 22


def with_envelope(**changes):
    def mutate(content, request):
        env = dict(content["envelope"])
        env.update(changes)
        return RecordDict({"envelope": ConfigRecord(env), "mechanism": content["mechanism"]})
    return mutate


def with_mechanism(**changes):
    def mutate(content, request):
        mech = dict(content["mechanism"])
        mech.update(changes)
        return RecordDict({"envelope": content["envelope"], "mechanism": ConfigRecord(mech)})
    return mutate


def flip_ciphertext(content, request):
    ct = bytearray(content["envelope"]["ciphertext"])
    ct[5] ^= 0xFF
    return with_envelope(ciphertext=bytes(ct))(content, request)


CASES = {
    "missing envelope": (lambda c, r: RecordDict({"mechanism": c["mechanism"]}), "malformed"),
    "extra record (stats outside the ledger)": (
        lambda c, r: RecordDict({**dict(c), "stats": MetricRecord({"peak_rss_mb": 1.0})}), "malformed"),
    "extra envelope field": (with_envelope(ciphertext_bytes=10**18), "malformed"),
    "chunk as a string": (with_envelope(chunk="0"), "malformed"),
    "chunk as a float": (with_envelope(chunk=0.5), "malformed"),
    "chunk as a bool": (with_envelope(chunk=False), "malformed"),
    "integer nonce (bytes(n) would allocate n bytes)": (with_envelope(nonce=2**40), "malformed"),
    "short nonce": (with_envelope(nonce=b"123"), "malformed"),
    "ciphertext as text": (with_envelope(ciphertext="abc"), "malformed"),
    "oversize ciphertext": (with_envelope(ciphertext=b"x" * 10**6), "oversized"),
    "tampered ciphertext": (flip_ciphertext, "auth"),
    "huge chunk claim": (with_envelope(num_chunks=10**9), "oversized"),
    "chunk out of order": (with_envelope(chunk=3), "order"),
    "noise other than asked": (with_mechanism(noise_multiplier=0.5), "mechanism"),
    "epsilon as text": (with_mechanism(epsilon="0"), "malformed"),
    "mechanism as metrics": (lambda c, r: RecordDict({"envelope": c["envelope"],
                                                       "mechanism": MetricRecord({"epsilon": 1.0})}), "malformed"),
    "refusal with extra fields": (lambda c, r: RecordDict({"refusal": ConfigRecord({"code": "x", "reason": "y",
                                                                                      "extra": 1})}), "malformed"),
    "not a record dict": (lambda c, r: "garbage", "malformed"),
    "empty reply": (lambda c, r: RecordDict({}), "malformed"),
}


def run_collect(tmp_path, evil: Node, **fed_changes):
    grid = ScriptedGrid({HONEST: Node({"partition-id": 0, "num-partitions": 2}),
                         EVIL: evil})
    pool = LatentPool(tmp_path / "pool")
    fed = collect(grid, tiny_encoder(), DATA, fed_config(**fed_changes), no_dp(), pool, 10, (28, 28))
    return fed, pool


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_reply_is_rejected_and_the_others_go_on(tmp_path, case):
    mutate, code = CASES[case]
    fed, pool = run_collect(tmp_path, Node({"partition-id": 1, "num-partitions": 2}, mutate))
    assert fed["accepted_nodes"] == [HONEST], case
    assert EVIL in fed["dropped_nodes"] and [r["code"] for r in fed["rejections"]] == [code], fed["rejections"]
    assert pool.committed_nodes() == {HONEST} and not pool._staged, "nothing of the bad node stays staged"


def test_random_mutations_never_escape(tmp_path):
    """Seeded random field replacements of every type a ConfigRecord can carry."""
    rng = random.Random(0)
    values = [0, -1, 2**62, 1.5, float("inf"), float("nan"), "", "x" * 1000, b"", b"\x00" * 64, True, [1, 2], ["a"]]
    for i in range(25):
        record, value = rng.choice(["envelope", "mechanism"]), rng.choice(values)

        def mutate(content, request, record=record, value=value):
            fields = dict(content[record])
            fields[rng.choice(sorted(fields))] = value
            return RecordDict({**dict(content), record: ConfigRecord(fields)})
        fed, pool = run_collect(tmp_path / str(i), Node({"partition-id": 1, "num-partitions": 2}, mutate))
        assert HONEST in fed["accepted_nodes"]
        assert EVIL in fed["accepted_nodes"] or EVIL in fed["dropped_nodes"]
        assert not pool._staged


def test_client_error_and_silence_are_drops(tmp_path):
    fed, _ = run_collect(tmp_path / "error", Node({}, error="boom"))
    assert "client error" in fed["dropped_nodes"][EVIL]
    fed, _ = run_collect(tmp_path / "silent", Node({"partition-id": 1, "num-partitions": 2}, lambda c, r: None),
                         timeout=0.5)
    assert "no reply" in fed["dropped_nodes"][EVIL] and fed["accepted_nodes"] == [HONEST]


def test_staged_memory_is_capped(tmp_path):
    """A node's latents are held until its last chunk arrives; the total held is capped."""
    fed, pool = run_collect(tmp_path, Node({"partition-id": 1, "num-partitions": 2}), chunk_size=20,
                            max_staged_mb=0.03)
    codes = {r["node_id"]: r["code"] for r in fed["rejections"]}
    assert "staging_cap" in codes.values() and not pool._staged
    fed, _ = run_collect(tmp_path / "claims", Node({"partition-id": 1, "num-partitions": 2}), chunk_size=20,
                         max_node_records=60)
    assert all(r["code"] == "oversized" for r in fed["rejections"]) and fed["rejections"]


def test_a_slow_node_cannot_hold_the_collection_past_its_deadline(tmp_path):
    """Replying just in time, chunk after chunk: the overall deadline ends it, the honest node is kept."""
    start = time.time()
    fed, pool = run_collect(tmp_path, Node({"partition-id": 1, "num-partitions": 2}, delay=0.5), chunk_size=10,
                            deadline=2.0)
    assert time.time() - start < 8
    assert "deadline" in fed["dropped_nodes"].get(EVIL, "") or "deadline" in fed["dropped_nodes"].get(HONEST, "")
    assert not pool._staged


def test_a_node_that_misses_a_timeout_is_asked_again_then_dropped(tmp_path):
    """One missed round costs a retry, not the node; a node that never answers is dropped after the retries."""
    silent_once = {"left": 1}

    def once(content, request):
        if silent_once["left"]:
            silent_once["left"] -= 1
            return None
        return content
    fed, pool = run_collect(tmp_path / "once", Node({"partition-id": 1, "num-partitions": 2}, once), retries=2,
                            timeout=0.5)
    assert fed["accepted_nodes"] == [HONEST, EVIL] and fed["retries"] == [{"node_id": EVIL, "chunk": 0, "attempt": 1}]
    fed, _ = run_collect(tmp_path / "never", Node({"partition-id": 1, "num-partitions": 2}, lambda c, r: None),
                         retries=2, timeout=0.5)
    assert "after 2 retries" in fed["dropped_nodes"][EVIL] and len(fed["retries"]) == 2


def test_the_first_encoder_travels_once_per_node(tmp_path):
    """Three chunks per node: E1's weights go with each node's first request only; the later requests name
    them by hash and are a small fraction of the size."""
    fed, pool = run_collect(tmp_path, Node({"partition-id": 1, "num-partitions": 2}), chunk_size=50)
    t = fed["traffic"]
    assert fed["accepted_nodes"] == [HONEST, EVIL] and t["encoder_sends"] == 2 and t["request_rounds"] >= 3
    e1_bytes = sum(v.numel() * 4 for v in tiny_encoder().state_dict().values())
    assert t["request_bytes"] < 2 * e1_bytes + t["request_rounds"] * 2 * 4096, t
    assert t["reply_bytes"] > fed["bytes_received"] > 0


def test_a_restarted_node_is_sent_the_encoder_again(tmp_path):
    """A node that restarts between its chunks has lost E1: it says so, gets it again, and is pooled."""
    evil = Node({"partition-id": 1, "num-partitions": 2}, restart_before=(1,))
    fed, pool = run_collect(tmp_path, evil, chunk_size=50)
    assert fed["accepted_nodes"] == [HONEST, EVIL] and fed["encoder_resends"] == {str(EVIL): 1}
    assert fed["traffic"]["encoder_sends"] == 3 and not fed["dropped_nodes"]
    assert evil.requests[:3] == [0, 1, 1], "chunk 1 asked again, with the encoder"


def test_waves_bound_the_requests_in_flight(tmp_path):
    """One node per request round: every node still completes, in order, nodes under way first."""
    honest_node, other = Node({"partition-id": 0, "num-partitions": 2}), Node({"partition-id": 1, "num-partitions": 2})
    grid = ScriptedGrid({HONEST: honest_node, EVIL: other})
    fed = collect(grid, tiny_encoder(), DATA, fed_config(chunk_size=50, wave=1), no_dp(), LatentPool(tmp_path / "p"),
                  10, (28, 28))
    assert fed["accepted_nodes"] == [HONEST, EVIL]
    assert fed["traffic"]["request_rounds"] == len(honest_node.requests) + len(other.requests)
    assert honest_node.requests == list(range(len(honest_node.requests))) and other.requests[0] == 0


def test_a_late_reply_to_an_earlier_request_is_accepted(tmp_path):
    """A node answers its first request after the round's wait, then never answers the retry (a SuperNode
    restarted mid-collection answers the request its killed process had taken, late): the late reply is
    taken, the node is pooled and not dropped, and the superseded request's silence costs nothing."""
    node = Node({"partition-id": 1, "num-partitions": 2})
    node.delay = lambda request: 1.6 if request == 0 else 0.0
    node.mutate = lambda content, request: None if len(node.requests) == 2 else content
    fed, pool = run_collect(tmp_path, node, timeout=1.0, retries=2, chunk_size=200)
    assert fed["accepted_nodes"] == [HONEST, EVIL] and not fed["dropped_nodes"], fed["dropped_nodes"]
    assert fed["late_replies"] == [{"node_id": EVIL, "chunk": 0}]
    assert fed["retries"] == [{"node_id": EVIL, "chunk": 0, "attempt": 1}] and node.requests[:2] == [0, 0]
