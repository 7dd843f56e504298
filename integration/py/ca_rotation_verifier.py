"""Continuous X.509-SVID verification across a CA rotation, with py-spiffe (PyPI `spiffe`)
X509Sources streaming from two workloads' Workload API sockets. Every ~50 ms each workload's
current X.509-SVID is verified, by full path validation (`cryptography`'s X.509 verifier), with
the bundle the *other* workload currently holds, as a peer would in mutual TLS.

Arguments: socket A, socket B, trust domain, seconds to run. Prints one JSON object: checks,
failures (with the first errors), the distinct CAs that signed the leaves seen, and the most
authorities a bundle held."""
import datetime
import json
import sys
import time

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import TrustDomain, X509Source

sock_a, sock_b, td_name, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
td = TrustDomain(td_name)
a = X509Source(socket_path=sock_a, timeout_in_seconds=10)
b = X509Source(socket_path=sock_b, timeout_in_seconds=10)


def signer_of(leaf):
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        return aki.value.key_identifier.hex()
    except x509.ExtensionNotFound:
        return leaf.issuer.rfc4514_string()


checks, failures, errors = 0, 0, []
signers, max_authorities = [], 0
end = time.time() + seconds
while time.time() < end:
    for me, peer in ((a, b), (b, a)):
        svid = me.svid
        bundle = peer.get_bundle_for_trust_domain(td)
        authorities = list(bundle.x509_authorities) if bundle else []
        max_authorities = max(max_authorities, len(authorities))
        leaf = svid.leaf
        s = signer_of(leaf)
        if s not in signers:
            signers.append(s)
        checks += 1
        try:
            verifier = (
                PolicyBuilder()
                .store(Store(authorities))
                .time(datetime.datetime.now(datetime.timezone.utc))
                .build_client_verifier()
            )
            verifier.verify(leaf, list(svid.cert_chain[1:]))
        except Exception as e:  # a failed verification, whatever the reason
            failures += 1
            if len(errors) < 5:
                errors.append(f"{type(e).__name__}: {e}")
    time.sleep(0.05)

a.close()
b.close()
print(json.dumps({
    "checks": checks,
    "failures": failures,
    "errors": errors,
    "signers": signers,
    "max_authorities": max_authorities,
}))
