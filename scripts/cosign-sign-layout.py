#!/usr/bin/env python3
"""Signs every named image of an OCI layout as cosign does, for the benchmarks: a new
ECDSA P-256 key (its public key written to PUBLIC), and per image a `sha256-<hex>.sig`
image of the same repository whose one layer is the simple-signing payload, with the
base64 signature in `dev.cosignproject.cosign/signature`. Made with Python's
`cryptography`, not with ShipperD's code.

    scripts/cosign-sign-layout.py LAYOUT PUBLIC
"""
import base64
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

layout, public = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP256R1())
with open(public, "wb") as f:
    f.write(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def put(data: bytes) -> tuple[str, int]:
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexd), "wb") as f:
        f.write(data)
    return "sha256:" + hexd, len(data)


with open(os.path.join(layout, "index.json")) as f:
    index = json.load(f)
config = put(b'{"architecture":"","config":{},"os":"","rootfs":{"type":"layers","diff_ids":[]}}')
added = []
for m in index["manifests"]:
    name = (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
    if not name or ":" not in name.rsplit("/", 1)[-1]:
        continue
    repo = name.rsplit(":", 1)[0]
    payload = json.dumps({"critical": {
        "identity": {"docker-reference": repo},
        "image": {"docker-manifest-digest": m["digest"]},
        "type": "cosign container image signature"}, "optional": None}).encode()
    sig = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    pd, ps = put(payload)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                    "digest": pd, "size": ps,
                    "annotations": {"dev.cosignproject.cosign/signature": sig}}],
    }).encode()
    md, ms = put(manifest)
    added.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "digest": md, "size": ms, "annotations": {
                      "org.opencontainers.image.ref.name":
                          f"{repo}:sha256-{m['digest'][7:]}.sig"}})
index["manifests"].extend(added)
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump(index, f)
print(f"{len(added)} images signed")
