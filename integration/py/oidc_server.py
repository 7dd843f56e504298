"""A stand-in for the Kubernetes API server's service-account issuer discovery, over HTTPS:
serves `<dir>/jwks.json` at /openid/v1/jwks and a discovery document naming it at
/.well-known/openid-configuration (issuer https://127.0.0.1:<port>). The file is read at each
request, so rewriting it rotates the keys. Arguments: dir, certificate PEM, key PEM. Prints
the port on the first line, then serves until killed."""
import http.server
import json
import os
import ssl
import sys

root, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        port = self.server.server_address[1]
        issuer = f"https://127.0.0.1:{port}"
        if self.path == "/.well-known/openid-configuration":
            body = json.dumps({
                "issuer": issuer,
                "jwks_uri": f"{issuer}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
            }).encode()
        elif self.path == "/openid/v1/jwks":
            with open(os.path.join(root, "jwks.json"), "rb") as f:
                body = f.read()
            with open(os.path.join(root, "jwks-fetches"), "a") as f:
                f.write("x")
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
