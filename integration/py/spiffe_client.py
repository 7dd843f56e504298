"""py-spiffe (PyPI `spiffe`) against the companion's SPIFFE Workload API. Reads only
SPIFFE_ENDPOINT_SOCKET; prints one JSON object describing what it got."""
import json

from spiffe import TrustDomain, WorkloadApiClient

out = {}
with WorkloadApiClient(default_timeout=10) as c:
    svid = c.fetch_x509_svid()
    out["x509_spiffe_id"] = str(svid.spiffe_id)
    out["x509_chain_len"] = len(svid.cert_chain)
    td = TrustDomain("example.org")
    bundle = c.fetch_x509_bundles().get_bundle_for_trust_domain(td)
    out["x509_bundle_authorities"] = len(bundle.x509_authorities) if bundle else 0
    jwt = c.fetch_jwt_svid(audience={"aud-py"})
    out["jwt_spiffe_id"] = str(jwt.spiffe_id)
    out["jwt_audience"] = sorted(jwt.audience)
    jb = c.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
    out["jwt_bundle_keys"] = len(jb.jwt_authorities) if jb else 0
    c.validate_jwt_svid(jwt.token, "aud-py")
    out["validate_good"] = "accepted"
    try:
        c.validate_jwt_svid(jwt.token, "some-other-audience")
        out["validate_wrong_audience"] = "accepted"
    except Exception as e:  # ValidateJwtSvidError wrapping the gRPC status
        out["validate_wrong_audience"] = "rejected: " + str(e)
print(json.dumps(out))
