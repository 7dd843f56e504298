"""Reads a SPIFFE bundle (SPIFFE Trust Domain and Bundle standard §4, X509-SVID §6, JWT-SVID
§6) with parsers nobody here wrote: PyJWT's RFC 7517 JWK Set parser for the whole document,
`cryptography` for the CA certificates in x5c, and py-spiffe's X509Bundle / JwtBundle /
JwtSvid for the per-purpose authorities (py-spiffe has no parser for the combined document, so
the entries are split by `use` first, as the standards tell consumers to). Then checks an
X.509-SVID and a JWT-SVID of the trust domain against it.

argv: bundle.json trust_domain leaf.pem jwt-svid-file audience. Prints JSON; "problems" lists
every clause the bundle breaks (empty when it conforms)."""
import json
import sys

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwt import PyJWK, PyJWKSet
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle

bundle_path, td_name, leaf_path, token_path, audience = sys.argv[1:6]
raw = open(bundle_path, "rb").read()
doc = json.loads(raw)
td = TrustDomain(td_name)
problems = []
out = {}


def need(cond, clause):
    if not cond:
        problems.append(clause)


# §4.1: the JWK Set; sequence and refresh hint SHOULD be set and are integers when present.
need(isinstance(doc.get("keys"), list), "4.1.3 keys MUST be present")
need(isinstance(doc.get("spiffe_sequence"), int), "4.1.1 spiffe_sequence SHOULD be set (integer)")
need(isinstance(doc.get("spiffe_refresh_hint"), int), "4.1.2 spiffe_refresh_hint SHOULD be set (integer seconds)")
out["sequence"] = doc.get("spiffe_sequence")
out["refresh_hint"] = doc.get("spiffe_refresh_hint")
# The whole document parses as an RFC 7517 JWK Set (kty, key parameters, no alg needed).
out["jwk_set_keys"] = len(PyJWKSet.from_dict(doc).keys)

KEY_PARAMS = {"EC": {"crv", "x", "y"}, "RSA": {"n", "e"}}
x509_ders, jwt_keys = [], []
for k in doc["keys"]:
    need("kty" in k, "4.2.1 kty MUST be set")
    need("use" in k, "4.2.2 use MUST be set")
    allowed = {"kty", "use"} | KEY_PARAMS.get(k.get("kty"), set())
    if k.get("use") == "x509-svid":
        need("kid" not in k, "X509-SVID 6.1 kid MUST NOT be set")
        x5c = k.get("x5c")
        need(isinstance(x5c, list) and len(x5c) == 1, "X509-SVID 6.1 x5c MUST hold exactly one CA certificate")
        allowed |= {"x5c"}
        der = __import__("base64").b64decode(x5c[0])
        cert = x509.load_der_x509_certificate(der)
        need(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca, "x5c holds a CA")
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        need(ku.key_cert_sign and not ku.digital_signature, "X509-SVID appendix A key usage of a CA")
        # The JWK's own key is the certificate's.
        jwk_pub = PyJWK.from_dict(k).key
        need(jwk_pub.public_numbers() == cert.public_key().public_numbers(), "JWK key == x5c key")
        x509_ders.append(der)
    elif k.get("use") == "jwt-svid":
        need(bool(k.get("kid")), "JWT-SVID kid MUST be set")
        allowed |= {"kid"}
        jwt_keys.append(k)
    else:
        problems.append("unknown use %r" % k.get("use"))
    extra = set(k) - allowed
    need(not extra, "4.2 SHOULD NOT include parameters defined neither here nor in the SVID spec: %s" % sorted(extra))

# py-spiffe: the X.509 authorities, and an X.509-SVID of the trust domain signed by one of them.
x509_bundle = X509Bundle.parse_raw(td, b"".join(x509_ders))
out["x509_authorities"] = len(x509_bundle.x509_authorities)
leaf = x509.load_pem_x509_certificate(open(leaf_path, "rb").read())
verified = False
for ca in x509_bundle.x509_authorities:
    try:
        ca.public_key().verify(
            leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
        )
        verified = True
    except Exception:
        pass
out["leaf_verified"] = verified

# py-spiffe: the JWT authorities, and a JWT-SVID validated against them.
jwt_bundle = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
out["jwt_authorities"] = len(jwt_keys)
svid = JwtSvid.parse_and_validate(open(token_path).read().strip(), jwt_bundle, {audience})
out["jwt_spiffe_id"] = str(svid.spiffe_id)
out["problems"] = problems
print(json.dumps(out))
