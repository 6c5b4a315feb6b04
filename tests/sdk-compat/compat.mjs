// SDK compatibility check: drives a creditgate server with the official
// @unkey/api v2 SDK and asserts the responses parse and behave like Unkey.
//
// Usage:
//   CREDITGATE_URL=http://127.0.0.1:7070 CREDITGATE_ROOT_KEY=... node compat.mjs
//
// Exits 0 on success, 1 on any failed step, 2 on bad configuration.

import { Unkey } from "@unkey/api";
import { Ratelimit, Overrides } from "@unkey/ratelimit";
import { createHash } from "node:crypto";
import { UnkeyError, ResponseValidationError, SDKValidationError } from "@unkey/api/models/errors";

const serverURL = process.env.CREDITGATE_URL;
const rootKey = process.env.CREDITGATE_ROOT_KEY;
if (!serverURL || !rootKey) {
  console.error("error: CREDITGATE_URL and CREDITGATE_ROOT_KEY must be set");
  process.exit(2);
}

const unkey = new Unkey({
  rootKey,
  serverURL,
  // Fail fast: the SDK's default retries 5xx / connection errors for ~10s.
  retryConfig: { strategy: "none" },
  timeoutMs: 15_000,
});

class AssertionFailed extends Error {}

function assert(cond, message) {
  if (!cond) throw new AssertionFailed(message);
}

function assertEq(actual, expected, what) {
  assert(
    actual === expected,
    `${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`,
  );
}

function assertMeta(res, op) {
  assert(res && typeof res === "object", `${op}: no response envelope`);
  assert(
    typeof res.meta?.requestId === "string" && res.meta.requestId.length > 0,
    `${op}: meta.requestId missing or empty`,
  );
}

function describeError(err) {
  const lines = [];
  lines.push(`${err?.name ?? "Error"}: ${err?.message ?? String(err)}`);
  if (err instanceof UnkeyError) {
    lines.push(`  HTTP status: ${err.statusCode}`);
    lines.push(`  content-type: ${err.contentType}`);
    lines.push(`  body: ${err.body}`);
  }
  if (err instanceof ResponseValidationError || err instanceof SDKValidationError) {
    try {
      lines.push(`  validation: ${err.pretty()}`);
    } catch {
      /* ignore */
    }
    lines.push(`  raw value: ${safeJson(err.rawValue)}`);
  }
  if (err?.cause && !(err instanceof ResponseValidationError)) {
    lines.push(`  cause: ${err.cause?.message ?? String(err.cause)}`);
  }
  return lines.join("\n");
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

let stepNo = 0;
async function step(name, fn) {
  stepNo += 1;
  const label = `[${String(stepNo).padStart(2, "0")}] ${name}`;
  process.stdout.write(`${label} ... `);
  try {
    const detail = await fn();
    console.log(detail ? `ok (${detail})` : "ok");
  } catch (err) {
    console.log("FAILED");
    err.__step = label;
    throw err;
  }
}

const state = { apiId: undefined, keyId: undefined, key: undefined, apiDeleted: false };

async function run() {
  const apiName = `sdk-compat-${Date.now()}`;

  await step(`apis.createApi name=${apiName}`, async () => {
    const res = await unkey.apis.createApi({ name: apiName });
    assertMeta(res, "createApi");
    assert(typeof res.data?.apiId === "string" && res.data.apiId.length > 0, "createApi: data.apiId missing");
    state.apiId = res.data.apiId;
    return `apiId=${state.apiId}`;
  });

  await step("keys.createKey credits={remaining:10}", async () => {
    const res = await unkey.keys.createKey({
      apiId: state.apiId,
      prefix: "compat",
      name: "sdk-compat key",
      credits: { remaining: 10 },
    });
    assertMeta(res, "createKey");
    assert(typeof res.data?.keyId === "string" && res.data.keyId.length > 0, "createKey: data.keyId missing");
    assert(typeof res.data?.key === "string" && res.data.key.length > 0, "createKey: data.key missing");
    assert(res.data.key.startsWith("compat"), `createKey: key ${JSON.stringify(res.data.key)} does not start with prefix "compat"`);
    state.keyId = res.data.keyId;
    state.key = res.data.key;
    return `keyId=${state.keyId}`;
  });

  await step("keys.verifyKey cost=3 -> VALID, credits 7", async () => {
    const res = await unkey.keys.verifyKey({ key: state.key, credits: { cost: 3 } });
    assertMeta(res, "verifyKey");
    assertEq(res.data.valid, true, "verifyKey(cost 3).valid");
    assertEq(res.data.code, "VALID", "verifyKey(cost 3).code");
    assertEq(res.data.credits, 7, "verifyKey(cost 3).credits");
    assertEq(res.data.keyId, state.keyId, "verifyKey(cost 3).keyId");
  });

  await step("keys.verifyKey cost=100 -> USAGE_EXCEEDED, credits 7", async () => {
    const res = await unkey.keys.verifyKey({ key: state.key, credits: { cost: 100 } });
    assertMeta(res, "verifyKey");
    assertEq(res.data.valid, false, "verifyKey(cost 100).valid");
    assertEq(res.data.code, "USAGE_EXCEEDED", "verifyKey(cost 100).code");
    assertEq(res.data.credits, 7, "verifyKey(cost 100).credits");
  });

  await step("keys.updateCredits increment 5 -> remaining 12", async () => {
    const res = await unkey.keys.updateCredits({ keyId: state.keyId, operation: "increment", value: 5 });
    assertMeta(res, "updateCredits");
    assertEq(res.data.remaining, 12, "updateCredits.data.remaining");
  });

  await step("keys.getKey -> credits.remaining 12", async () => {
    const res = await unkey.keys.getKey({ keyId: state.keyId });
    assertMeta(res, "getKey");
    assertEq(res.data.keyId, state.keyId, "getKey.data.keyId");
    assertEq(res.data.credits?.remaining, 12, "getKey.data.credits.remaining");
    assert(typeof res.data.start === "string" && res.data.start.length > 0, "getKey.data.start missing/empty");
    assert(
      state.key.startsWith(res.data.start),
      `getKey.data.start ${JSON.stringify(res.data.start)} is not a prefix of the key`,
    );
    assert(res.data.start !== state.key, "getKey.data.start must not be the full key");
    assertEq(res.data.enabled, true, "getKey.data.enabled");
    assert(Number.isInteger(res.data.createdAt) && res.data.createdAt > 0, "getKey.data.createdAt not a positive integer");
  });

  await step("keys.whoami", async () => {
    const res = await unkey.keys.whoami({ key: state.key });
    assertMeta(res, "whoami");
    assertEq(res.data.keyId, state.keyId, "whoami.data.keyId");
    assertEq(res.data.credits?.remaining, 12, "whoami.data.credits.remaining");
  });

  // creditgate's extension: the SDK has no hold routes, so the hold is made over plain
  // HTTP; the SDK must then still read the key whose credits carry `reserved`.
  await step("keys.getKey with credits.reserved (an open hold)", async () => {
    const r = await fetch(`${serverURL}/v2/keys.reserveCredits`, {
      method: "POST",
      headers: { authorization: `Bearer ${rootKey}`, "content-type": "application/json" },
      body: JSON.stringify({ key: state.key, amount: 2 }),
    });
    const body = await r.json();
    assertEq(r.status, 200, "reserveCredits status");
    assertEq(body.data.credits, 10, "reserveCredits.data.credits");
    const res = await unkey.keys.getKey({ keyId: state.keyId });
    assertEq(res.data.credits?.remaining, 10, "getKey.data.credits.remaining beside a hold");
    const release = await fetch(`${serverURL}/v2/keys.releaseCredits`, {
      method: "POST",
      headers: { authorization: `Bearer ${rootKey}`, "content-type": "application/json" },
      body: JSON.stringify({ holdId: body.data.holdId }),
    });
    assertEq(release.status, 200, "releaseCredits status");
  });

  await step("apis.listKeys contains key", async () => {
    const page = await unkey.apis.listKeys({ apiId: state.apiId });
    assertMeta(page.result, "listKeys");
    assert(Array.isArray(page.result.data), "listKeys.result.data is not an array");
    assert(typeof page.result.pagination?.hasMore === "boolean", "listKeys.result.pagination.hasMore missing");
    let found = false;
    let pages = 0;
    for await (const p of page) {
      pages += 1;
      assert(pages <= 50, "listKeys: more than 50 pages (cursor never ends?)");
      if (p.result.data.some((k) => k.keyId === state.keyId)) {
        found = true;
        break;
      }
    }
    assert(found, `listKeys: key ${state.keyId} not found`);
  });

  const externalId = `sdk-compat-${Date.now()}`;
  await step(`identities.createIdentity externalId=${externalId}`, async () => {
    const res = await unkey.identities.createIdentity({ externalId, meta: { plan: "pro" } });
    assertMeta(res, "createIdentity");
    assert(typeof res.data?.identityId === "string" && res.data.identityId.length > 0, "createIdentity: data.identityId missing");
    state.identityId = res.data.identityId;
    return `identityId=${state.identityId}`;
  });

  await step("keys.updateKey externalId -> verifyKey answers the identity", async () => {
    const upd = await unkey.keys.updateKey({ keyId: state.keyId, externalId });
    assertMeta(upd, "updateKey");
    const res = await unkey.keys.verifyKey({ key: state.key, credits: { cost: 0 } });
    assertMeta(res, "verifyKey");
    assertEq(res.data.identity?.id, state.identityId, "verifyKey.identity.id");
    assertEq(res.data.identity?.externalId, externalId, "verifyKey.identity.externalId");
    assertEq(res.data.identity?.meta?.plan, "pro", "verifyKey.identity.meta.plan");
  });

  await step("identities.getIdentity / updateIdentity / listIdentities", async () => {
    const got = await unkey.identities.getIdentity({ identity: externalId });
    assertMeta(got, "getIdentity");
    assertEq(got.data.id, state.identityId, "getIdentity.id");
    const upd = await unkey.identities.updateIdentity({ identity: state.identityId, meta: { plan: "team" } });
    assertMeta(upd, "updateIdentity");
    assertEq(upd.data.meta?.plan, "team", "updateIdentity.meta.plan");
    const page = await unkey.identities.listIdentities({ limit: 100 });
    let found = false;
    let pages = 0;
    for await (const p of page) {
      pages += 1;
      assert(pages <= 50, "listIdentities: more than 50 pages (cursor never ends?)");
      if (p.result.data.some((i) => i.id === state.identityId)) {
        found = true;
        break;
      }
    }
    assert(found, `listIdentities: identity ${state.identityId} not found`);
  });

  await step("rate limits on a key and its identity: verifyKey ratelimits[], RATE_LIMITED spends nothing", async () => {
    const upd = await unkey.identities.updateIdentity({
      identity: state.identityId,
      ratelimits: [{ name: "requests", limit: 100, duration: 2592000000, autoApply: true }],
    });
    assertMeta(upd, "updateIdentity ratelimits");
    assertEq(upd.data.ratelimits?.[0]?.name, "requests", "updateIdentity.ratelimits[0].name");
    const created = await unkey.keys.createKey({
      apiId: state.apiId,
      externalId,
      credits: { remaining: 10 },
      ratelimits: [{ name: "tokens", limit: 5, duration: 2592000000, autoApply: false }],
    });
    assertMeta(created, "createKey ratelimits");
    const got = await unkey.keys.getKey({ keyId: created.data.keyId });
    assertEq(got.data.ratelimits?.[0]?.name, "tokens", "getKey.ratelimits[0].name");
    const ok = await unkey.keys.verifyKey({ key: created.data.key, ratelimits: [{ name: "tokens", cost: 4 }] });
    assertMeta(ok, "verifyKey ratelimits");
    assertEq(ok.data.code, "VALID", "verifyKey.code");
    const tokens = ok.data.ratelimits?.find((r) => r.name === "tokens");
    const requests = ok.data.ratelimits?.find((r) => r.name === "requests");
    assertEq(tokens?.remaining, 1, "tokens.remaining");
    assertEq(tokens?.exceeded, false, "tokens.exceeded");
    assertEq(requests?.autoApply, true, "the identity's auto-applied limit is checked");
    assert(tokens.reset > Date.now(), `tokens.reset ${tokens.reset} is not a time ahead`);
    const refused = await unkey.keys.verifyKey({ key: created.data.key, ratelimits: [{ name: "tokens", cost: 4 }] });
    assertEq(refused.data.code, "RATE_LIMITED", "verifyKey.code past the limit");
    assertEq(refused.data.valid, false, "verifyKey.valid past the limit");
    const after = await unkey.keys.getKey({ keyId: created.data.keyId });
    assertEq(after.data.credits?.remaining, 9, "a rate-limited verification spends no credits");
    await unkey.keys.deleteKey({ keyId: created.data.keyId });
  });

  await step("a shared pool (opened over plain HTTP, creditgate's extension): the SDK's verifyKey tolerates identity.credits", async () => {
    const res = await fetch(`${serverURL}/v2/identities.updateCredits`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${rootKey}` },
      body: JSON.stringify({ identity: state.identityId, operation: "set", value: 3 }),
    });
    assertEq(res.status, 200, "identities.updateCredits status");
    const v = await unkey.keys.verifyKey({ key: state.key, credits: { cost: 2 } });
    assertEq(v.data.code, "VALID", "verifyKey of a pooled key");
    const raw = await fetch(`${serverURL}/v2/keys.verifyKey`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${rootKey}` },
      body: JSON.stringify({ key: state.key, credits: { cost: 2 } }),
    }).then((r) => r.json());
    assertEq(raw.data.code, "USAGE_EXCEEDED", "the pool (1 left) cannot pay 2");
    assertEq(raw.data.identity?.credits?.remaining, 1, "identity.credits.remaining");
  });

  await step("identities.deleteIdentity", async () => {
    const res = await unkey.identities.deleteIdentity({ identity: state.identityId });
    assertMeta(res, "deleteIdentity");
  });

  await step("ratelimit.limit 2 per window: pass, pass, refuse; multiLimit", async () => {
    const check = { namespace: "sdk.compat", identifier: externalId, limit: 2, duration: 2592000000 }; // 30 days: no window ends mid-step
    const answers = [];
    for (let i = 0; i < 3; i += 1) {
      const res = await unkey.ratelimit.limit(check);
      assertMeta(res, "ratelimit.limit");
      answers.push(res.data.success);
      assert(res.data.reset > Date.now() - 1000, `ratelimit.limit: reset ${res.data.reset} is not a time ahead`);
    }
    assertEq(JSON.stringify(answers), JSON.stringify([true, true, false]), "ratelimit.limit successes");
    const multi = await unkey.ratelimit.multiLimit([{ ...check, identifier: `${externalId}-2` }, check]);
    assertMeta(multi, "ratelimit.multiLimit");
    assertEq(multi.data.passed, false, "multiLimit.passed");
    assertEq(multi.data.limits[0].passed, true, "multiLimit.limits[0].passed");
    assertEq(multi.data.limits[1].passed, false, "multiLimit.limits[1].passed");
  });

  await step("ratelimit overrides: set (pattern and exact), get, list, limit applies them, delete", async () => {
    const namespace = "sdk.overrides";
    const pattern = await unkey.ratelimit.setOverride({ namespace, identifier: `*@${externalId}.com`, limit: 1, duration: 2592000000 });
    assertMeta(pattern, "setOverride");
    const exact = await unkey.ratelimit.setOverride({ namespace, identifier: `ceo@${externalId}.com`, limit: 3, duration: 2592000000 });
    const got = await unkey.ratelimit.getOverride({ namespace, identifier: `*@${externalId}.com` });
    assertEq(got.data.overrideId, pattern.data.overrideId, "getOverride.overrideId");
    assertEq(got.data.limit, 1, "getOverride.limit");
    const list = await unkey.ratelimit.listOverrides({ namespace, limit: 1 });
    assertMeta(list.result, "listOverrides");
    const ids = [];
    let pages = 0;
    for await (const p of list) {
      pages += 1;
      assert(pages <= 10, "listOverrides: more than 10 pages (cursor never ends?)");
      ids.push(...p.result.data.map((o) => o.overrideId));
    }
    assertEq(JSON.stringify(ids.sort()), JSON.stringify([pattern.data.overrideId, exact.data.overrideId].sort()), "listOverrides ids");
    const ann = await unkey.ratelimit.limit({ namespace, identifier: `ann@${externalId}.com`, limit: 100, duration: 60000 });
    assertEq(ann.data.limit, 1, "limit under the pattern override");
    assertEq(ann.data.overrideId, pattern.data.overrideId, "limit.overrideId");
    const ceo = await unkey.ratelimit.limit({ namespace, identifier: `ceo@${externalId}.com`, limit: 100, duration: 60000 });
    assertEq(ceo.data.overrideId, exact.data.overrideId, "the exact override wins");
    const del = await unkey.ratelimit.deleteOverride({ namespace, identifier: `ceo@${externalId}.com` });
    assertMeta(del, "deleteOverride");
  });

  await step("@unkey/ratelimit: Ratelimit.limit 2 per window passes 2 of 3; Overrides reads one", async () => {
    const limiter = new Ratelimit({ rootKey, baseUrl: serverURL, namespace: "sdk.ratelimit", limit: 2, duration: "30d" });
    const results = [];
    for (let i = 0; i < 3; i += 1) {
      const res = await limiter.limit(`${externalId}-pkg`);
      results.push(res.success);
      assert(res.reset > Date.now(), `Ratelimit.limit: reset ${res.reset} is not ahead`);
    }
    assertEq(JSON.stringify(results), JSON.stringify([true, true, false]), "Ratelimit.limit successes");
    const overrides = new Overrides({ rootKey, baseUrl: serverURL });
    const set = await overrides.setOverride({ namespace: "sdk.ratelimit", identifier: `${externalId}-vip`, limit: 5, duration: 60000 });
    const got = await overrides.getOverride({ namespace: "sdk.ratelimit", identifier: `${externalId}-vip` });
    assertEq(got.data.overrideId, set.data.overrideId, "Overrides.getOverride");
    const vip = await limiter.limit(`${externalId}-vip`);
    assertEq(vip.limit, 5, "Ratelimit.limit under an override");
  });

  await step("keys.rerollKey: a new secret for the same key; the old one stops (expiration 0)", async () => {
    const res = await unkey.keys.rerollKey({ keyId: state.keyId, expiration: 0 });
    assertMeta(res, "rerollKey");
    assertEq(res.data.keyId, state.keyId, "rerollKey.keyId");
    assert(res.data.key !== state.key, "rerollKey: the secret did not change");
    const old = await unkey.keys.verifyKey({ key: state.key, credits: { cost: 0 } });
    assertEq(old.data.code, "NOT_FOUND", "the old secret after a reroll");
    const fresh = await unkey.keys.verifyKey({ key: res.data.key, credits: { cost: 0 } });
    assertEq(fresh.data.code, "VALID", "the new secret");
    assertEq(fresh.data.keyId, state.keyId, "the new secret opens the same key");
    state.key = res.data.key;
  });

  await step("keys.migrateKeys: a key imported by its SHA-256 verifies with its secret", async () => {
    const secret = `legacy_${externalId}`;
    const hash = createHash("sha256").update(secret).digest("hex");
    const res = await unkey.keys.migrateKeys({
      migrationId: "sdk-compat",
      apiId: state.apiId,
      keys: [{ hash, credits: { remaining: 5 } }, { hash }],
    });
    assertMeta(res, "migrateKeys");
    assertEq(res.data.migrated.length, 1, "migrateKeys.migrated");
    assertEq(res.data.migrated[0].hash, hash, "migrateKeys.migrated[0].hash");
    assertEq(JSON.stringify(res.data.failed), JSON.stringify([hash]), "migrateKeys.failed (the same hash twice)");
    const v = await unkey.keys.verifyKey({ key: secret, credits: { cost: 2 } });
    assertEq(v.data.code, "VALID", "verifyKey of a migrated key");
    assertEq(v.data.credits, 3, "verifyKey.credits of a migrated key");
    await unkey.keys.deleteKey({ keyId: res.data.migrated[0].keyId });
  });

  await step("keys.deleteKey", async () => {
    const res = await unkey.keys.deleteKey({ keyId: state.keyId });
    assertMeta(res, "deleteKey");
  });

  await step("keys.verifyKey deleted key -> NOT_FOUND", async () => {
    const res = await unkey.keys.verifyKey({ key: state.key });
    assertMeta(res, "verifyKey");
    assertEq(res.data.valid, false, "verifyKey(deleted).valid");
    assertEq(res.data.code, "NOT_FOUND", "verifyKey(deleted).code");
  });

  await step("apis.deleteApi", async () => {
    const res = await unkey.apis.deleteApi({ apiId: state.apiId });
    assertMeta(res, "deleteApi");
    state.apiDeleted = true;
  });
}

try {
  await run();
  console.log("\nPASS: all SDK compatibility steps succeeded");
  process.exit(0);
} catch (err) {
  console.error(`\nFAIL at ${err.__step ?? "(unknown step)"}`);
  console.error(describeError(err));
  // Best-effort cleanup so repeated runs don't accumulate APIs.
  if (state.apiId && !state.apiDeleted) {
    try {
      await unkey.apis.deleteApi({ apiId: state.apiId });
      console.error(`(cleanup: deleted api ${state.apiId})`);
    } catch (cleanupErr) {
      console.error(`(cleanup of api ${state.apiId} failed: ${cleanupErr?.message ?? cleanupErr})`);
    }
  }
  process.exit(1);
}
