// The AWS SDK for JavaScript v3 (@aws-sdk/credential-providers, installed by
// scripts/install-deps into /opt/nhi-test/jsclients) resolving credentials from the
// container-credential provider. argv[2]: the install dir; argv[3]: the provider:
//   chain        fromNodeProviderChain() — what SDK clients use by default
//   http         fromHttp()              — reads AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
//   cmds         fromContainerMetadata() — reads only AWS_CONTAINER_AUTHORIZATION_TOKEN
//   cmds-file    fromContainerMetadata() after the app put the token file's content into its own
//                process environment (docs/USING.md's workaround: nothing in the container spec)
// Prints JSON: the access key id, hashes of the secret parts (never the values), the expiration
// as the SDK parsed it; or {"error"}.
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { createRequire } = require("node:module");

const sdk = createRequire(path.join(process.argv[2], "package.json"))(
  "@aws-sdk/credential-providers"
);
const h = (v) => crypto.createHash("sha256").update(v || "").digest("hex");

async function main() {
  const mode = process.argv[3];
  let provider;
  switch (mode) {
    case "chain":
      provider = sdk.fromNodeProviderChain();
      break;
    case "http":
      provider = sdk.fromHttp({});
      break;
    case "cmds":
      provider = sdk.fromContainerMetadata({ maxRetries: 0, timeout: 2000 });
      break;
    case "cmds-file":
      process.env.AWS_CONTAINER_AUTHORIZATION_TOKEN = fs
        .readFileSync(process.env.AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, "utf8")
        .trim();
      provider = sdk.fromContainerMetadata({ maxRetries: 0, timeout: 2000 });
      break;
    default:
      throw new Error("unknown mode " + mode);
  }
  const c = await provider();
  return {
    access_key: c.accessKeyId,
    secret_sha256: h(c.secretAccessKey),
    token_sha256: h(c.sessionToken),
    expiration: c.expiration ? c.expiration.toISOString() : null,
  };
}

main().then(
  (out) => console.log(JSON.stringify(out)),
  (e) => console.log(JSON.stringify({ error: `${e.name}: ${e.message}` }))
);
