"""botocore (PyPI) resolving credentials through its default chain, with only
AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE set. Prints JSON:
the access key id and the method botocore used, plus hashes of the secret parts (never the
values). argv[1] == "refresh": resolve, wait for a line on stdin, read the credentials again."""
import hashlib
import json
import sys

import botocore.session


def h(v):
    return hashlib.sha256((v or "").encode()).hexdigest()


out = {}
try:
    creds = botocore.session.get_session().get_credentials()
except Exception as e:  # botocore's CredentialRetrievalError and friends
    print(json.dumps({"error": type(e).__name__ + ": " + str(e)}))
    sys.exit(0)
if creds is None:
    print(json.dumps({"error": "no credentials found"}))
    sys.exit(0)


def snap():
    f = creds.get_frozen_credentials()
    return {
        "method": creds.method,
        "access_key": f.access_key,
        "secret_sha256": h(f.secret_key),
        "token_sha256": h(f.token),
    }


out["first"] = snap()
if len(sys.argv) > 1 and sys.argv[1] == "refresh":
    print("ready", flush=True)
    sys.stdin.readline()
    out["second"] = snap()
print(json.dumps(out), flush=True)
