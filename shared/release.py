"""Every field that leaves a device, with the type the server accepts and how the ledger covers it.

The device's reply (client/app.py) holds exactly these records and fields; the server's intake
(server/federation/collect.py) rejects anything else, and the privacy ledger (server/federation/ledger.py) prints this
table, so a field cannot leave a device without a ledger entry (tests/test_release_schema.py).

Coverage classes:
- `mechanism`: covered by the ledger's epsilon (shared/accounting.py);
- `public`: a function of the record count n alone, which is public under the replace-one relation
  (neighbouring datasets have the same size), or of the server's request and the device's policy;
- `random`: fresh OS randomness, independent of the data.
"""
from __future__ import annotations

# record -> field -> (accepted types, coverage class, what it is)
REPLY_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], str, str]]] = {
    "envelope": {
        "ciphertext": ((bytes,), "mechanism",
                       "AES-GCM-sealed payload: float16 latents after the Gaussian mechanism and uint8 labels after "
                       "randomized response (or in the clear where labels are declared public); its length is "
                       "a function of the chunk's record count (with group means: of the released labels' counts, "
                       "which the label mechanism covers)"),
        "ephemeral_public": ((bytes,), "random", "a fresh X25519 public key per message"),
        "nonce": ((bytes,), "random", "12 random bytes per message"),
        "version": ((int,), "public", "envelope format version (a constant)"),
        "cipher": ((str,), "public", "cipher suite name (a constant)"),
        "run_id": ((str,), "public", "echo of the server's request"),
        "node_id": ((int,), "public", "echo of the server's request"),
        "round": ((int,), "public", "echo of the server's request"),
        "chunk": ((int,), "public", "echo of the server's request"),
        "num_chunks": ((int,), "public", "ceil(n / chunk_size): a function of the device's record count n"),
    },
    "mechanism": {
        "clip_norm": ((float,), "public", "latent clip norm C applied (the server's request, checked by the policy)"),
        "noise_multiplier": ((float,), "public", "latent noise multiplier sigma applied"),
        "delta": ((float,), "public", "delta of the request"),
        "label_mechanism": ((str,), "public", "'randomized_response' or 'public'"),
        "label_epsilon": ((float,), "public", "randomized response epsilon (0 when labels are public)"),
        "group_size": ((int,), "public", "k: each released latent is the mean of k same-label records (1: per record)"),
        "epsilon": ((float,), "public", "the per-record epsilon as the device computed it (inf without noise)"),
        "encoder_sha256": ((str,), "public", "SHA-256 of the first encoder the device ran"),
    },
}

ENCODER_MISSING = "encoder_missing"
REFUSAL_FIELDS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "code": ((str,), "public", "why the device refused: encoder, noise, labels, delta or epsilon; or "
                               "encoder_missing (a node that lost the first encoder asks for it again)"),
    "reason": ((str,), "public", "the refusal in words (depends on the request and the device's policy only)"),
}


def ledger_table() -> list[dict]:
    """The table the privacy ledger prints: one row per field that can leave a device."""
    rows = [{"record": rec, "field": name, "coverage": cov, "what": what}
            for rec, fields in REPLY_FIELDS.items() for name, (_, cov, what) in fields.items()]
    rows += [{"record": "refusal", "field": name, "coverage": cov, "what": what}
             for name, (_, cov, what) in REFUSAL_FIELDS.items()]
    return rows
