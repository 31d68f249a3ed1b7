#!/usr/bin/env python3
"""Mints the keys and tokens the consumer-auth tests send, with PyJWT (and
its `cryptography` backend): a real signer, not the gateway's own library.

`python3 jwt_peer.py mint` prints one JSON line:
  keys:   public PEMs (rs256, es256, eddsa), the HS256 secret, and a JWKS
          document holding one more RSA key (kid "jwks-1")
  tokens: name -> compact JWT (valid ones per algorithm, and every kind of
          bad one the tests check)
"""
import base64
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm

ISS = "https://idp.test"
AUD = "shop"
HS_SECRET = "hs256-secret-for-the-test-0123456789abcdef"


def pem_public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()

    jwk = json.loads(RSAAlgorithm.to_jwk(jwks_key.public_key()))
    jwk.update({"kid": "jwks-1", "alg": "RS256", "use": "sig"})

    # `tenant`: the claim the test route requires.
    claims = {"iss": ISS, "aud": AUD, "sub": "user-1", "tenant": "t1", "iat": now, "exp": now + 600}

    def sign(key, alg, kid, **over):
        body = dict(claims)
        body.update(over)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    good_rs = sign(rsa_key, "RS256", "rs-1")
    # The payload changed after signing (a claim edited by hand).
    h, p, s = good_rs.split(".")
    payload = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    payload["sub"] = "admin"
    tampered = ".".join([h, b64(json.dumps(payload).encode()), s])
    # `alg: none`: an unsigned token naming a known kid.
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rs-1"}).encode())
    alg_none = ".".join([none_header, b64(json.dumps(claims).encode()), ""])

    tokens = {
        "rs256": good_rs,
        "es256": sign(ec_key, "ES256", "es-1"),
        "eddsa": sign(ed_key, "EdDSA", "ed-1"),
        "hs256": sign(HS_SECRET, "HS256", "hs-1"),
        "jwks": sign(jwks_key, "RS256", "jwks-1"),
        "expired": sign(rsa_key, "RS256", "rs-1", iat=now - 7200, exp=now - 3600),
        "not_yet": sign(rsa_key, "RS256", "rs-1", nbf=now + 3600),
        "wrong_audience": sign(rsa_key, "RS256", "rs-1", aud="other"),
        "wrong_issuer": sign(rsa_key, "RS256", "rs-1", iss="https://evil.test"),
        "wrong_key": sign(other_rsa, "RS256", "rs-1"),
        "no_exp": sign(rsa_key, "RS256", "rs-1", exp=None),
        "no_tenant": sign(rsa_key, "RS256", "rs-1", tenant=None),
        "alg_none": alg_none,
        "tampered": tampered,
        # A payload too large for the gateway to read (still under the
        # listener's head limit).
        "huge": sign(rsa_key, "RS256", "rs-1", pad="x" * 20000),
        "unknown_kid": sign(rsa_key, "RS256", "nobody"),
    }
    print(json.dumps({
        "keys": {
            "rs256": pem_public(rsa_key),
            "es256": pem_public(ec_key),
            "eddsa": pem_public(ed_key),
            "hs256": HS_SECRET,
            "jwks": {"keys": [jwk]},
        },
        "tokens": tokens,
        "issuer": ISS,
        "audience": AUD,
    }))


if __name__ == "__main__":
    if sys.argv[1:] != ["mint"]:
        sys.exit("usage: jwt_peer.py mint")
    main()
